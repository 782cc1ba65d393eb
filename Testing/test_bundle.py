"""Config JSON round trip and validation; model bundles: round trip, atomic replace, specific errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cotexnet import BundleError, CoTexNet, CoTexNetConfig, ConfigError
from cotexnet.bundle import load_backbone
from cotexnet.prompts import save_tokenizer


def test_config_json_round_trip(tmp_path):
    config = CoTexNetConfig(classes=["liver", "tumor"], keywords=["liver", "liver tumor"], image_size=224,
                            kd_mode="mse", kl_form="softmax", kd_weight=10, use_real_text=False)
    config.to_json_file(tmp_path / "c.json")
    again = CoTexNetConfig.from_json_file(tmp_path / "c.json")
    assert again == config and again.kd_weight == 10.0 and again.colors == config.colors


@pytest.mark.parametrize("fields, field_name", [
    ({"classes": []}, "classes"),
    ({"classes": ["a", "a"]}, "classes"),
    ({"classes": ["a"], "keywords": ["x", "y"]}, "keywords"),
    ({"classes": ["a"], "colors": [[1, 2, 3]]}, "colors"),
    ({"classes": ["a"], "kd_mode": "distill"}, "kd_mode"),
    ({"classes": ["a"], "kl_form": "js"}, "kl_form"),
    ({"classes": ["a"], "variant": "unet"}, "variant"),
    ({"classes": ["a"], "alpha_init": 1.5}, "alpha_init"),
    ({"classes": ["a"], "dropout": 1.0}, "dropout"),
    ({"classes": ["a"], "image_size": 8}, "image_size"),
    ({"classes": ["a"], "use_real_text": "yes"}, "use_real_text"),
    ({"classes": ["a"], "kd_weight": float("nan")}, "kd_weight"),
    ({"classes": ["a"], "use_text_encoder": False}, "use_real_text"),
    ({"classes": ["a"], "slice_axis": "oblique"}, "slice_axis"),
])
def test_invalid_config_values_name_the_field(fields, field_name):
    with pytest.raises(ConfigError, match=f"^{field_name}:"):
        CoTexNetConfig(**fields)


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"classes": ["a"], "shiny": 1}), encoding="utf-8")
    with pytest.raises(ConfigError, match="config.json: unknown field.*shiny"):
        CoTexNetConfig.from_json_file(path)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        CoTexNetConfig.from_json_file(path)


@pytest.fixture
def bundle(tmp_path, tiny_model):
    model = tiny_model(classes=["gm", "wm"]).eval()
    with torch.no_grad():
        model.sigma.fill_(1.25)  # a trained-looking value must survive the round trip
    path = model.save_pretrained(tmp_path / "model", training_info={"epochs": 3})
    return model, path


def test_bundle_round_trip_gives_identical_outputs(bundle):
    model, path = bundle
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "training.json"} <= names
    loaded = CoTexNet.from_pretrained(path, device="cpu")
    images = torch.rand(2, 3, 64, 64)
    for name, tensor in model.state_dict().items():  # weights bit for bit
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():  # so the outputs differ at most by the order of float sums (another kernel's blocking)
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=1e-6)
    assert loaded.sigma.item() == 1.25 and loaded.config.classes == ["gm", "wm"]
    assert json.loads((path / "training.json").read_text(encoding="utf-8")) == {"epochs": 3}


def test_saving_over_a_bundle_replaces_it_whole(bundle, tiny_model):
    _, path = bundle
    tiny_model(classes=["a", "b", "c"]).save_pretrained(path)
    assert CoTexNet.from_pretrained(path).config.classes == ["a", "b", "c"]
    assert not (path / "training.json").exists()
    assert [p.name for p in path.parent.iterdir()] == ["model"]  # no staging or backup left behind


def test_saving_never_overwrites_a_folder_that_is_not_a_bundle(tmp_path, tiny_model):
    folder = tmp_path / "my-scans"
    folder.mkdir()
    (folder / "patient.nii.gz").write_bytes(b"precious")
    with pytest.raises(BundleError, match="not a CoTexNet bundle"):
        tiny_model().save_pretrained(folder)
    assert (folder / "patient.nii.gz").read_bytes() == b"precious"


def test_missing_bundle_directory(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        CoTexNet.from_pretrained(tmp_path / "nope")


def test_bundle_path_that_is_a_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(BundleError, match="is a directory, this is a file"):
        CoTexNet.from_pretrained(tmp_path / "model.safetensors")


def test_missing_weights(bundle):
    _, path = bundle
    (path / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors: weights file is missing"):
        CoTexNet.from_pretrained(path)


def test_corrupt_weights(bundle):
    _, path = bundle
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="corrupt or unreadable weights"):
        CoTexNet.from_pretrained(path)


def test_pickled_weights_are_never_loaded(bundle):
    """A .bin pickle beside missing safetensors is not a fallback: nothing from the bundle is executed."""
    _, path = bundle
    (path / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, path / "pytorch_model.bin")
    with pytest.raises(BundleError, match="weights file is missing"):
        CoTexNet.from_pretrained(path)


def test_newer_format_version(bundle):
    _, path = bundle
    data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    data["format_version"] = 99
    (path / "config.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(BundleError, match="format_version 99 is newer"):
        CoTexNet.from_pretrained(path)


def test_weights_that_do_not_match_the_config(bundle):
    _, path = bundle
    data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    data["classes"] = ["a", "b", "c"]
    data["keywords"], data["colors"] = None, None
    (path / "config.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(BundleError, match=r"shape mismatch: clipseg\.decoder\.transposed_convolution\.4\.weight"):
        CoTexNet.from_pretrained(path)


def test_unavailable_backbone_names_it_and_says_how_to_get_it_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BundleError, match=r"'CIDAS/clipseg-rd64-refined'.*--local-dir DIR"):
        load_backbone("CIDAS/clipseg-rd64-refined", cache_dir=tmp_path)


def test_a_synthetic_backbone_is_drawn_the_same_under_either_transformers_major():
    """``build_clipseg`` draws every weight itself (CI runs this under transformers 4.x and 5.x): the decoder's FiLM,
    reduction and upsampling layers at PyTorch's default (uniform, std 1/sqrt(3 fan_in)), not transformers 5's
    generic N(0, 1) for a CLIPSeg config (std ~1, with which a tiny model did not learn); CLIP's own scheme for the
    encoders; the same draws for the same seed; and the caller's random stream untouched, so the layers CoTexNet
    adds after the backbone start the same under both majors."""
    from cotexnet.bundle import build_clipseg, clipseg_architecture

    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    clipseg = build_clipseg(clipseg_architecture("tiny", 64))
    assert torch.equal(torch.rand(4), expected_next)
    decoder = clipseg.decoder
    for layer in (decoder.film_mul, decoder.film_add, *decoder.reduces):  # Linear(32 -> 16)
        assert layer.weight.std().item() == pytest.approx((3 * 32) ** -0.5, rel=0.25)
        assert torch.count_nonzero(layer.bias) == 0  # linear biases zeroed, as CLIPSeg's scheme does
    upsampling = decoder.transposed_convolution[0]  # ConvTranspose2d(16, 16, 3): fan_in 16 x 9
    assert upsampling.weight.std().item() == pytest.approx((3 * 16 * 9) ** -0.5, rel=0.25)
    vision = clipseg.clip.vision_model.encoder.layers[0].self_attn  # CLIP's N(0, d^-1/2 (2L)^-1/2): d 32, L 4
    assert vision.q_proj.weight.std().item() == pytest.approx(32 ** -0.5 * (2 * 4) ** -0.5, rel=0.25)
    again = build_clipseg(clipseg_architecture("tiny", 64))
    assert all(torch.equal(a, b) for a, b in zip(clipseg.state_dict().values(), again.state_dict().values()))


def test_local_backbone_directory_loads_offline(tmp_path):
    """A backbone folder saved the way Hugging Face stores it loads with no network."""
    clipseg, tokenizer = load_backbone("tiny", image_size=64)
    clipseg.save_pretrained(tmp_path / "clipseg")
    save_tokenizer(tokenizer, tmp_path / "clipseg")
    model = CoTexNet.from_config(CoTexNetConfig(classes=["a"], backbone=str(tmp_path / "clipseg"), image_size=64))
    vision = model.clipseg.clip.vision_model.embeddings.patch_embedding.weight
    torch.testing.assert_close(vision, clipseg.clip.vision_model.embeddings.patch_embedding.weight)


def test_backbone_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "clipseg").mkdir()
    with pytest.raises(BundleError, match="no model.safetensors"):
        load_backbone(str(tmp_path / "clipseg"))


def test_pickled_backbone_loads_weights_but_never_runs_code(tmp_path):
    """Older Hugging Face repositories hold only pytorch_model.bin: tensors load, a code-running pickle does not."""
    clipseg, tokenizer = load_backbone("tiny", image_size=64)
    folder = tmp_path / "clipseg"
    clipseg.config.save_pretrained(folder)  # transformers 5 saves no pickle any more: written as old repositories hold it
    torch.save(clipseg.state_dict(), folder / "pytorch_model.bin")
    save_tokenizer(tokenizer, folder)
    assert not (folder / "model.safetensors").exists() and (folder / "pytorch_model.bin").is_file()
    loaded, _ = load_backbone(str(folder), image_size=64)
    torch.testing.assert_close(loaded.decoder.film_mul.weight, clipseg.decoder.film_mul.weight)

    witness = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {witness}",))

    torch.save({"clip.logit_scale": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(BundleError, match="could not load CLIPSeg weights"):
        load_backbone(str(folder), image_size=64)
    assert not witness.exists()


def test_bundle_config_reads_without_torch(bundle):
    """Slicer shows a model's classes before its dependencies (torch) are installed."""
    import subprocess
    import sys

    _, path = bundle
    code = ("import sys; sys.modules['torch'] = None\n"
            "from cotexnet.bundle import read_bundle_config\n"
            f"print(read_bundle_config({str(path)!r}).classes)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          encoding="utf-8", errors="replace", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['gm', 'wm']"


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_bundle_saved_by_the_first_release_loads_with_identical_logits_and_saves_the_same_bytes(tmp_path):
    """``fixtures/bundle_v1`` was written by the engine at commit c547d33 (``fixtures/make_bundle_v1.py``);
    today's loader must give the logits that code gave, and saving it again must reproduce every weight bit for
    bit and its config field for field.

    The logits are compared within 1e-5: the reference was computed on one CPU, and float32 sums taken in
    another order (another thread count, AVX2 instead of AVX-512 kernels) move these logits (|x| < 0.43) by
    ~1e-7 (1.04e-7 seen on a second x86 machine); a changed computation (a layer, a weight, a normalisation)
    moves them by orders of magnitude more."""
    import numpy as np
    from safetensors import safe_open

    reference = np.load(FIXTURES / "bundle_v1_reference.npz", allow_pickle=False)
    model = CoTexNet.from_pretrained(FIXTURES / "bundle_v1")
    assert model.config.slice_axis == "coronal" and model.config.intensity["window"] == "brain"
    with torch.inference_mode():
        logits = model(torch.from_numpy(reference["images"]))
    expected = torch.from_numpy(reference["logits"])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    again = model.save_pretrained(tmp_path / "again")
    # Tensor for tensor and bit for bit (the file's header lists tensors in a per-process hash order).
    saved, original = (safe_open(str(path / "model.safetensors"), "pt") for path in (again, FIXTURES / "bundle_v1"))
    assert saved.metadata() == original.metadata() and sorted(saved.keys()) == sorted(original.keys())
    for name in original.keys():
        a, b = saved.get_tensor(name), original.get_tensor(name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (json.loads((again / "config.json").read_text(encoding="utf-8"))
            == json.loads((FIXTURES / "bundle_v1" / "config.json").read_text(encoding="utf-8")))


def test_model_constructor_uses_the_backbone_it_is_given_and_never_loads_one(monkeypatch):
    """Only CoTexNet.from_config resolves ``config.backbone``; the constructor never downloads or reads it."""
    from cotexnet import bundle, model as modeling
    from cotexnet.bundle import build_clipseg, clipseg_architecture
    from cotexnet.prompts import load_tokenizer, offline_clip_tokenizer_dir

    def refuse(*args, **kwargs):
        raise AssertionError("the constructor tried to load a backbone")

    monkeypatch.setattr(bundle, "download_backbone", refuse)
    monkeypatch.setattr(modeling, "load_backbone", refuse)
    backbone = build_clipseg(clipseg_architecture("tiny", 64))
    config = CoTexNetConfig(classes=["a"], backbone="CIDAS/clipseg-rd64-refined", image_size=64)
    model = CoTexNet(config, backbone=backbone, tokenizer=load_tokenizer(offline_clip_tokenizer_dir()))
    assert model.clipseg is backbone and config.backbone_config == backbone.config.to_dict()
    with pytest.raises(TypeError):
        CoTexNet(config)
