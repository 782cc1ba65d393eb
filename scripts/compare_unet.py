"""CoTexNet on the tiny backbone with its default recipe vs a plain 2D MONAI UNet, on the demo's MNI152 task.

Both train on the same cases and slices (the demo's split, axial slices resized to 96 px) and are scored
by held-out mean Dice on the demo's test case through the same metric. The UNet: 16-128 channels, end to
end, no augmentation, 40 epochs, Adam at lr 3e-3, batch 4. Prints one JSON object (time and Dice of each).

    python scripts/compare_unet.py [--out FOLDER] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def train_unet(data: Path, device: torch.device, epochs: int = 40, size: int = 96, lr: float = 3e-3,
               batch_size: int = 4, seed: int = 0) -> tuple[float, float]:
    """(seconds, held-out mean Dice) of the MONAI UNet baseline."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from torch.utils.data import DataLoader

    from cotexnet.data import IntensityNormalization, SliceDataset, load_dataset, load_split, read_image
    from cotexnet.data import VolumeImage, read_label_map, resize_slices, stack_slices, volume_slices
    from cotexnet.metrics import segmentation_metrics

    torch.manual_seed(seed)
    index = load_dataset(data)
    split = load_split(data / "split.json")
    normalization = IntensityNormalization.for_modality(index.modality)
    slices = SliceDataset(index, "train", normalization=normalization, split=split, image_size=size, seed=seed)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=len(index.classes) + 1, channels=(16, 32, 64, 128),
               strides=(2, 2, 2), num_res_units=2).to(device)
    loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    started = time.perf_counter()
    loader = DataLoader(slices, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        net.train()
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            value = loss(net(batch["image"][:, :1].to(device)), batch["label"][:, None].to(device))
            value.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    net.eval()
    case = index.case(split["test"][0])
    image = read_image(case.image_path)
    truth = read_label_map(case.label_path, reference=image, classes=index.classes)
    normalized = VolumeImage(normalization.apply(image.array), image.spacing, image.origin, image.direction)
    stack = torch.from_numpy(np.ascontiguousarray(volume_slices(normalized, "axial"))).float()[:, None]
    with torch.inference_mode():
        logits = net(resize_slices(stack, size).to(device)).cpu()
    labels = resize_slices(logits, stack.shape[-2:]).argmax(1).numpy().astype(np.uint8)
    labels = stack_slices(labels, image, "axial")
    scores = segmentation_metrics(labels, truth, len(index.classes), spacing=image.spacing[::-1])
    return seconds, scores["mean"]["dice"]


def train_cotexnet(data: Path, out: Path, device: str) -> tuple[float, float]:
    """(seconds, held-out mean Dice) of ``cotexnet train DATA --backbone tiny --out RUN`` (defaults only)."""
    from cotexnet.cli import main
    from cotexnet.infer import evaluate

    started = time.perf_counter()
    main(["train", str(data), "--backbone", "tiny", "--out", str(out), "--device", device])
    seconds = time.perf_counter() - started
    result = evaluate(out, data, split="test", device=device, show_progress=False)
    return seconds, result["mean"]["dice"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from cotexnet.demo import write_mni152_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        data = write_mni152_dataset(root / "data")
        unet_seconds, unet_dice = train_unet(data, torch.device(args.device))
        cotexnet_seconds, cotexnet_dice = train_cotexnet(data, root / "cotexnet", args.device)
    print(json.dumps({"unet": {"seconds": round(unet_seconds, 1), "held_out_mean_dice": round(unet_dice, 4)},
                      "cotexnet_tiny_defaults": {"seconds": round(cotexnet_seconds, 1),
                                                 "held_out_mean_dice": round(cotexnet_dice, 4)},
                      "torch_threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
