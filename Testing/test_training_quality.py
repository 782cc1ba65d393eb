"""Training users can rely on: laterality kept under flips, rare classes learned, cached steps equal to
uncached ones, fine-tuning from a bundle, recipes per backbone, and run folders accepted as bundles."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from cotexnet import CoTexNet
from cotexnet.cli import main
from cotexnet.data import ForegroundBatchSampler, load_dataset, read_image
from cotexnet.demo import write_mni152_dataset
from cotexnet.infer import evaluate, segment_volume
from cotexnet.train import TrainOptions, Trainer, train

HEMISPHERES = ["left grey matter", "right grey matter"]


def world_x(image) -> np.ndarray:
    """LPS x (mm) of every voxel of a 3D image, from its geometry (x > 0 is the patient's left)."""
    matrix = image.geometry.ijk_to_lps()
    k, j, i = np.indices(image.shape)  # array (z, y, x) = index (k, j, i)
    return matrix[0, 0] * i + matrix[0, 1] * j + matrix[0, 2] * k + matrix[0, 3]


def split_hemispheres(image, labels):
    """Grey matter split at the midline by each voxel's world x: 1 left, 2 right; white matter dropped."""
    grey, x = labels.array == 1, world_x(image)
    return np.where(grey & (x > 0), 1, np.where(grey & (x <= 0), 2, 0)), HEMISPHERES


def add_rare_class(image, labels):
    """Grey and white matter plus "deep grey": grey matter within 12 mm of the centre on 6 axial slices of 91,
    a class present on under 10% of the slices that hold any label."""
    array = labels.array.copy()
    x = world_x(image)
    matrix = image.geometry.ijk_to_lps()
    k, j, _ = np.indices(image.shape)
    y = matrix[1, 0] * np.indices(image.shape)[2] + matrix[1, 1] * j + matrix[1, 2] * k + matrix[1, 3]
    middle = image.shape[0] // 2
    rare = (labels.array >= 1) & (np.hypot(x, y + 18) < 12) & (np.abs(k - middle) < 3)
    array[rare] = 3
    return array, ["grey matter", "white matter", "deep grey"]


@pytest.fixture(scope="module")
def hemispheres(tmp_path_factory):
    return write_mni152_dataset(tmp_path_factory.mktemp("hemispheres"), relabel=split_hemispheres)


def own_side_shares(bundle, data) -> list[float]:
    """Share of each class's predicted voxels on its own side of the midline, on the held-out case (nan when
    a class is never predicted)."""
    model = CoTexNet.from_pretrained(bundle)
    image = read_image(data / "imagesTr" / "mni152_04_0000.nii.gz")
    labels = segment_volume(model, image, device="cpu")
    x = world_x(image)
    left, right = x[labels == 1], x[labels == 2]
    return [float((left > 0).mean()) if left.size else math.nan, float((right <= 0).mean()) if right.size else math.nan]


def test_left_right_flips_swap_paired_classes_and_keep_laterality(hemispheres, tmp_path):
    """With anatomy-aware flips (a left-right flip swaps "left/right grey matter"), at least 95% of each
    class's predicted voxels lie on its own side; the same run with label-blind flips fails that."""
    # The random recipe (96 px: a 6 x 6 patch grid; the encoder and its position embeddings train): a
    # slice tells left from right only by position, which 64 px (4 x 4 patches, 12 epochs) did not learn.
    common = dict(data=str(hemispheres), backbone="tiny", epochs=40, device="cpu", show_progress=False)
    events = []
    aware = train(TrainOptions(out=str(tmp_path / "aware"), flips="anatomy", **common),
                  on_event=lambda event, **values: events.append((event, values)))
    blind = train(TrainOptions(out=str(tmp_path / "blind"), flips="all", **common))
    start = next(values for event, values in events if event == "start")
    assert start["augmentation"]["axes"] == ["x"] and start["augmentation"]["left_right_axis"] == "x"
    info = json.loads((aware / "training.json").read_text(encoding="utf-8"))
    assert info["augmentation"]["pairs"] == [HEMISPHERES]
    aware_shares, blind_shares = own_side_shares(aware, hemispheres), own_side_shares(blind, hemispheres)
    print(f"own-side share (left, right): anatomy flips {aware_shares}, label-blind flips {blind_shares}")
    assert all(share >= 0.95 for share in aware_shares)
    assert not all(share >= 0.95 for share in blind_shares)  # nan (a class never predicted) fails the check too


def rare_class_dataset(root, size: int = 64):
    """2D pictures of a bright disk ("disk") and a dark square ("square") on grey; 4 of the 48 training pictures
    and 2 of the 6 validation pictures also hold a mid-grey triangle ("triangle"): the rare class."""
    from PIL import Image

    from cotexnet.data import save_split

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    rare = {3, 17, 29, 41, 48, 51}
    for i in range(54):
        image = np.full((size, size), 120, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        cy, cx = rng.integers(14, size - 14, 2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < 12 ** 2
        sy, sx = rng.integers(2, size - 20, 2)
        square = (yy >= sy) & (yy < sy + 18) & (xx >= sx) & (xx < sx + 18) & ~disk
        image[disk], mask[disk] = 220, 1
        image[square], mask[square] = 30, 2
        if i in rare:
            ty, tx = rng.integers(2, size - 26, 2)
            triangle = (yy >= ty) & (yy < ty + 24) & (xx >= tx) & (xx - tx <= yy - ty) & (mask == 0)
            image[triangle], mask[triangle] = 70, 3
        Image.fromarray(image).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i:02d}.png")
    names = [f"case{i:02d}" for i in range(54)]
    save_split({"train": names[:48], "val": names[48:]}, root / "split.json")
    return root


def test_rare_class_is_learned_and_reported_per_class(tmp_path):
    """A class on under 10% of the training slices ends training with validation Dice > 0 under the random
    recipe (96 px, 80 epochs) with foreground oversampling, its default; per-class validation Dice is in
    metrics.csv and in the epoch events. The untrained model's first validation can overlap the class by
    chance, so the last epoch is what counts. (The tiny model learns one class after another: at 40 epochs the
    triangle still had Dice 0 while the disk had 0.95 and the square 0.76.)"""
    data = rare_class_dataset(tmp_path / "data")
    events = []
    options = TrainOptions(data=str(data), out=str(tmp_path / "run"), classes=["disk", "square", "triangle"],
                           backbone="tiny", device="cpu", show_progress=False)
    trainer = Trainer(options, on_event=lambda event, **values: events.append((event, values)))
    trainer.run()
    share = trainer.train_set.class_presence()[:, 2].mean()
    assert 0 < share < 0.10
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open(encoding="utf-8")))
    rare = [float(row["val_dice_triangle"]) for row in rows]
    epochs = [values for event, values in events if event == "epoch"]
    assert [e["val_dice_per_class"]["triangle"] for e in epochs] == pytest.approx(rare, abs=1e-6)
    print(f"rare class on {share:.1%} of training slices; validation Dice per epoch {rare}")
    assert rare[-1] > 0


def test_foreground_sampler_draws_its_share_from_each_class():
    presence = np.zeros((100, 2), dtype=bool)
    presence[:90, 0] = True
    presence[95:, 1] = True  # 5% of the items
    sampler = ForegroundBatchSampler(presence, batch_size=6, share=0.33, seed=1)
    sampler.set_epoch(3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 16 and all(len(b) == 6 for b in batches)
    assert batches == list(sampler)  # the same for the same (seed, rank, epoch)
    forced = [i for b in batches for i in b[4:]]
    rare = np.mean([presence[i, 1] for i in forced])
    assert 0.3 < rare < 0.7  # the forced places pick either class with equal odds
    sampler.set_epoch(4)
    assert list(sampler) != batches


def step_losses(data, out, cache: str) -> list[float]:
    losses = []
    options = TrainOptions(data=str(data), out=str(out), backbone="tiny", image_size=64, epochs=2, device="cpu",
                           show_progress=False, augment=False, train_encoder="none", feature_cache=cache,
                           config_overrides={"dropout": 0.0})
    trainer = Trainer(options, on_event=lambda event, **values: event == "step" and losses.append(values["loss"]))
    trainer.run()
    assert (trainer.cache is not None) == (cache == "auto")
    return losses


def test_cached_and_uncached_training_give_the_same_losses(mni152_dataset, tmp_path):
    """Augmentation off: every step's loss with the frozen encoders' outputs from the cache equals the loss
    computed on the fly, epoch 2 reading what epoch 1 stored. The first step agrees to 16-bit rounding of the
    stored features; later steps drift by the optimiser steps taken on those rounded features (~0.3%)."""
    cached = step_losses(mni152_dataset, tmp_path / "cached", "auto")
    direct = step_losses(mni152_dataset, tmp_path / "direct", "off")
    assert len(cached) == len(direct) > 4
    assert cached[0] == pytest.approx(direct[0], rel=1e-4)
    np.testing.assert_allclose(cached, direct, rtol=1e-2)
    assert not (tmp_path / "cached" / "feature_cache").exists()  # dropped at the end of the run


def test_feature_cache_falls_back_over_its_cap(mni152_dataset, tmp_path):
    options = TrainOptions(data=str(mni152_dataset), out=str(tmp_path / "run"), backbone="tiny", image_size=64,
                           epochs=1, device="cpu", show_progress=False, train_encoder="none", cache_limit_gb=1e-6)
    warnings = []
    trainer = Trainer(options, on_event=lambda event, **values: event == "warning" and warnings.append(values))
    trainer.run()
    assert trainer.cache is None and "feature cache off" in warnings[0]["message"]


def test_the_cache_goes_to_gpu_memory_only_when_every_view_fits_in_its_share(tmp_path):
    """Half the free GPU memory must hold every view; else the files on disk, as many views as the disk cap allows."""
    from cotexnet.feature_cache import RESIDENT_SHARE, CacheLayout, plan_cache

    layout = CacheLayout(layers=3, tokens=37, width=32, projection=32, classes=2, image_size=96, roi=True)
    # 3 x 37 x 32 + 32 x (1 + 2) halves, and one byte per label pixel
    assert layout.entry_bytes == 2 * (3 * 37 * 32 + 32 * 3) + 96 * 96
    need = 100 * 4 * layout.entry_bytes  # 100 slices x 4 views
    fits = plan_cache(layout, 100, 4, 2**40, tmp_path / "a", free_gpu_bytes=int(need / RESIDENT_SHARE))
    assert fits.resident and fits.views == 4 and "in GPU memory" in fits.message
    assert not (tmp_path / "a").exists()  # nothing on disk for a cache in GPU memory
    short = plan_cache(layout, 100, 4, 2**40, tmp_path / "b", free_gpu_bytes=int(need / RESIDENT_SHARE) - 1)
    assert not short.resident and short.views == 4 and str(tmp_path / "b") in short.message
    # --cache-limit-gb caps the disk, not GPU memory, which the run gives back when it ends
    assert plan_cache(layout, 100, 4, need - 1, tmp_path / "c", free_gpu_bytes=2**40).resident
    capped = plan_cache(layout, 100, 4, need - 1, tmp_path / "c", free_gpu_bytes=need)
    assert not capped.resident and capped.views == 3
    assert not plan_cache(layout, 100, 4, 2**40, tmp_path / "d", free_gpu_bytes=None).resident  # no GPU


def test_a_cache_in_device_memory_trains_as_the_files_do(mni152_dataset, tmp_path, monkeypatch, caplog):
    """The cache that a GPU holds (in tensors on the training device, here the CPU's memory): every step's loss
    equals the memory-mapped files' bit for bit (the same 16-bit features), and no file is written."""
    from cotexnet import feature_cache

    on_disk = step_losses(mni152_dataset, tmp_path / "disk", "auto")
    plan = feature_cache.plan_cache
    def plenty_of_gpu_memory(layout, items, views, limit, folder, free):
        return plan(layout, items, views, limit, folder, 2**40)

    monkeypatch.setattr(feature_cache, "plan_cache", plenty_of_gpu_memory)
    monkeypatch.setattr(feature_cache, "reserve", lambda path, size: pytest.fail(f"{path} written"))
    with caplog.at_level("INFO", logger="cotexnet"):
        in_memory = step_losses(mni152_dataset, tmp_path / "memory", "auto")
    assert any("in GPU memory" in record.getMessage() for record in caplog.records)
    assert in_memory == on_disk and len(on_disk) > 4


def test_recipes_per_backbone_are_recorded():
    tiny = TrainOptions(data="d", out="o", backbone="tiny")
    paper = TrainOptions(data="d", out="o", backbone="CIDAS/clipseg-rd64-refined")
    assert (tiny.recipe, tiny.train_encoder, tiny.lr, tiny.image_size) == ("random", "all", 3e-3, 96)
    assert (paper.recipe, paper.train_encoder, paper.lr, paper.image_size, paper.batch_size) == (
        "paper", "none", 3e-4, 352, 8)
    assert TrainOptions(data="d", out="o", backbone="tiny", lr=1e-4).lr == 1e-4  # given options win
    with pytest.raises(ValueError, match="train_encoder"):
        TrainOptions(data="d", out="o", backbone="tiny", train_encoder="last-x")


def test_train_encoder_last_k_trains_only_those_layers(tiny_model):
    model = tiny_model()
    model.set_encoder_training("last-1")
    layers = model.vision.encoder.layers
    assert all(p.requires_grad for p in layers[-1].parameters())
    assert not any(p.requires_grad for layer in layers[:-1] for p in layer.parameters())
    assert model.encoder_trains
    model.set_encoder_training("none")
    assert not model.encoder_trains and not any(p.requires_grad for p in model.clipseg.clip.text_model.parameters())


def test_default_tiny_recipe_learns_the_demo_task(mni152_dataset, tmp_path):
    """``cotexnet train DATA --backbone tiny --out RUN`` with no other option: held-out mean Dice >= 0.7 on the
    MNI152 grey/white matter task, each class > 0.4, far above the untrained model; one metrics row per epoch
    (the recipe's patience lets every epoch run), and the run folder is accepted where a bundle is."""
    from cotexnet import CoTexNetConfig
    from cotexnet.config import RECIPES

    assert main(["train", str(mni152_dataset), "--backbone", "tiny", "--out", str(tmp_path / "run"),
                 "--device", "cpu"]) == 0
    untrained = CoTexNet.from_config(CoTexNetConfig(classes=["grey matter", "white matter"], backbone="tiny",
                                                    image_size=RECIPES["random"]["image_size"]))
    untrained.save_pretrained(tmp_path / "untrained")
    before = evaluate(tmp_path / "untrained", mni152_dataset, split="test", device="cpu", show_progress=False)
    after = evaluate(tmp_path / "run", mni152_dataset, split="test", device="cpu", show_progress=False)
    print(f"held-out mean Dice: untrained {before['mean']['dice']:.3f}, tiny defaults {after['mean']['dice']:.3f}")
    assert after["cases"][0]["case"] == "mni152_04"  # the held-out case of split.json
    assert after["mean"]["dice"] >= 0.7
    assert after["mean"]["dice"] > before["mean"]["dice"] + 0.3
    assert all(row["dice"] > 0.4 for row in after["per_class"])
    epochs = RECIPES["random"]["epochs"]
    assert (tmp_path / "run" / "metrics.csv").read_text(encoding="utf-8").count("\n") == epochs + 1  # header + rows
    info = json.loads((tmp_path / "run" / "best" / "training.json").read_text(encoding="utf-8"))
    assert info["recipe"]["name"] == "random" and info["recipe"]["train_encoder"] == "all"


def test_init_from_keeps_weights_and_adds_classes_by_name(tmp_path, tiny_model):
    """A bundle of (grey, white matter) starts a run on (white matter, grey matter, deep grey): every weight
    but the head is kept, head channels follow the names, the new class starts as the negated background."""
    source = tiny_model(classes=("grey matter", "white matter"), image_size=64)
    source.save_pretrained(tmp_path / "source")

    def reordered(image, labels):
        array, _ = add_rare_class(image, labels)
        return np.choose(array, [0, 2, 1, 3]), ["white matter", "grey matter", "deep grey"]

    data = write_mni152_dataset(tmp_path / "data", relabel=reordered)
    trainer = Trainer(TrainOptions(data=str(data), out=str(tmp_path / "run"), backbone="tiny", device="cpu",
                                   init_from=str(tmp_path / "source")))
    trainer.index = load_dataset(str(data))
    trainer.build_model()
    model, old = trainer.model, source.state_dict()
    new = model.state_dict()
    assert model.config.classes == ["white matter", "grey matter", "deep grey"] and model.config.image_size == 64
    for key in ("clipseg.decoder.transposed_convolution.4.bias", "clipseg.decoder.transposed_convolution.4.weight"):
        dim = 0 if key.endswith("bias") else 1
        old_head, new_head = old[key].movedim(dim, 0), new[key].movedim(dim, 0)
        assert torch.equal(new_head[:3], old_head[[0, 2, 1]]) and torch.equal(new_head[3], -old_head[0])
    assert all(torch.equal(new[k], v) for k, v in old.items() if "transposed_convolution.4" not in k)
    tiny_model(classes=("grey matter", "csf"), image_size=64).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"\['csf'\] are not among"):
        Trainer(TrainOptions(data=str(data), out=str(tmp_path / "run2"), backbone="tiny", device="cpu",
                             init_from=str(tmp_path / "other"))).initialize()


def test_slicer_continue_from_this_model_reaches_the_engine(tmp_path):
    """CoTexNetTrain's "Continue from model" becomes ``--init-from``, which the engine's parser reads."""
    from CoTexNetTrainLib.logic import _trainArguments

    from cotexnet.cli import build_parser

    arguments = _trainArguments(tmp_path / "data", ["gm"], tmp_path / "run", None,
                                {"backbone": "tiny", "initFrom": str(tmp_path / "old"), "epochs": None})
    assert arguments[-2:] == ["--init-from", str(tmp_path / "old")] and "--epochs" not in arguments
    assert build_parser().parse_args(["train", *arguments]).init_from == str(tmp_path / "old")


def test_segment_and_evaluate_take_a_run_folder_as_its_best_bundle(mni152_dataset, tmp_path, tiny_model, caplog,
                                                                   monkeypatch, capsys):
    """``segment RUN`` and ``evaluate RUN`` use ``RUN/best`` (not ``RUN/last``) and say so in one log line."""
    import logging

    import cotexnet.bundle

    run = tmp_path / "run"
    train(TrainOptions(data=str(mni152_dataset), out=str(run), backbone="tiny", image_size=64, epochs=1,
                       max_steps_per_epoch=3, device="cpu", show_progress=False))
    tiny_model(classes=("grey matter", "white matter")).save_pretrained(run / "last")  # last differs from best
    image = str(mni152_dataset / "imagesTr" / "mni152_04_0000.nii.gz")

    def command(*arguments) -> tuple[str, list[str]]:
        monkeypatch.setattr(cotexnet.bundle, "_announced_runs", set())
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cotexnet.bundle"):
            assert main([*arguments, "--device", "cpu", "--json"]) == 0
        said = [r.getMessage() for r in caplog.records if "training run folder" in r.getMessage()]
        return capsys.readouterr().out, said

    def segmented(model, out) -> tuple[np.ndarray, list[str]]:
        _, said = command("segment", str(model), image, "--out", str(tmp_path / out), "--no-seg-nrrd")
        labels = read_image(next((tmp_path / out).glob("*.nii.gz"))).array
        return labels, said

    from_run, said = segmented(run, "run_out")
    assert said == [f"{run} is a training run folder: using its best model, {run / 'best'}"]
    assert np.array_equal(from_run, segmented(run / "best", "best_out")[0])
    assert not np.array_equal(from_run, segmented(run / "last", "last_out")[0])
    evaluated, said = command("evaluate", str(run), str(mni152_dataset))
    assert len(said) == 1
    assert json.loads(evaluated)["mean"] == json.loads(command("evaluate", str(run / "best"), str(mni152_dataset))[0])["mean"]
