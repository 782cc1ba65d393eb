"""Backbones and model bundles.

A *backbone* is where CLIPSeg's weights come from: a Hugging Face id (downloaded once into the
Hugging Face cache, honouring ``HF_HUB_OFFLINE`` and a cache directory), a local directory holding it,
``tiny`` (a small random-init CLIPSeg for tests and demos — **not for real use**) or ``full-random``
(the real ViT-B/16 CLIPSeg architecture with random weights, for offline speed measurements).

A *bundle* is a trained model directory, Hugging Face style (docs/bundle-format.md)::

    config.json         CoTexNetConfig, including the backbone architecture and format version
    model.safetensors   every weight (safetensors: loading never unpickles or runs code)
    vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    training.json       data, metrics and attributes used (optional)
    README.md           the model card (cotexnet.card), rewritten with every save

Bundles are written to a temporary sibling directory and renamed into place, so an interrupted save
never leaves a half-written bundle where a good one was. torch loads on first use, so a bundle's config
can be read (in Slicer, before dependencies are installed) without it.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .atomic import write_folder_atomic, write_json_atomic
from .config import (CONFIG_NAME, DEFAULT_IMAGE_SIZE, FORMAT_VERSION, SYNTHETIC_BACKBONES, TRAINING_NAME, WEIGHTS_NAME,
                     CoTexNetConfig)
from .data.normalization import IntensityNormalization
from .errors import BundleError, CoTexNetError, ConfigError, error_summary
from .prompts import load_tokenizer, offline_clip_tokenizer_dir, save_tokenizer

#: Older Hugging Face repositories hold only this pickle; backbones may use it, bundles never do.
PICKLED_WEIGHTS_NAME = "pytorch_model.bin"
#: Files of a Hugging Face CLIPSeg repository that loading needs (the pickle only as a fallback).
BACKBONE_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
                  "special_tokens_map.json", "preprocessor_config.json")
#: The bundle a training run folder stands for wherever a bundle is expected (see cotexnet.train).
RUN_BEST = "best"

logger = logging.getLogger(__name__)
_announced_runs: set[Path] = set()


def clipseg_architecture(name: str, image_size: int):
    """transformers ``CLIPSegConfig`` of a synthetic backbone (``tiny`` or ``full-random``)."""
    from transformers import CLIPSegConfig

    text = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    if name == "tiny":
        # 4 vision layers, decoder fed by layers 0-2: the last layer runs CLS-only at inference, as in ViT-B/16.
        text.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                      image_size=image_size, patch_size=16)
        decoder = dict(projection_dim=32, extract_layers=[0, 1, 2], reduce_dim=16, decoder_num_attention_heads=2,
                       decoder_intermediate_size=32)
    elif name == "full-random":
        # The architecture of CIDAS/clipseg-rd64-refined: CLIP ViT-B/16, rd64 decoder, refined upsampling.
        text.update(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16)
        decoder = dict(projection_dim=512, extract_layers=[3, 6, 9], reduce_dim=64, decoder_num_attention_heads=4,
                       decoder_intermediate_size=2048)
    else:
        raise ConfigError(f"backbone: unknown synthetic backbone {name!r}; expected one of {SYNTHETIC_BACKBONES}")
    return CLIPSegConfig(text_config=text, vision_config=vision, conditional_layer=0,
                         use_complex_transposed_convolution=True, **decoder)


def build_clipseg(clipseg_config, seed: int = 0):
    """A randomly initialised ``CLIPSegForImageSegmentation``, the same tensor for tensor for a given seed under
    transformers 4.40+ and 5.x.

    The library's own initialisation differs by major: transformers 5 draws the decoder's FiLM, reduction and
    upsampling layers from N(0, initializer_factor = 1), about 6x PyTorch's default that transformers 4 leaves
    there, and a tiny model so drawn did not learn the demo task (held-out Dice 0.06). So every weight is drawn
    again here, by :func:`initialize_clipseg`, whatever the library did.
    """
    import torch
    from transformers import CLIPSegForImageSegmentation

    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was, under either major
        model = CLIPSegForImageSegmentation(clipseg_config)
        torch.manual_seed(seed)
        with torch.no_grad():
            initialize_clipseg(model)
    return model.eval()


def initialize_clipseg(model) -> None:
    """Draw every weight of a CLIPSeg model in the order and with the rules of transformers 4.x's construction.

    Each part (the CLIP model, then the decoder) is built with PyTorch's default initialisation, module by module
    in the order its constructors run, then re-drawn by CLIPSeg's scheme in post-order (children before their
    parent): N(0, 0.02 f) text embeddings; N(0, d^-1/2 f) class embedding; N(0, initializer_range f) patch and
    position embeddings; attention q/k/v N(0, d^-1/2 (2L)^-1/2 f) and output N(0, d^-1/2 f); MLP fc1 N(0, (2d)^-1/2 f)
    and fc2 N(0, d^-1/2 (2L)^-1/2 f); projections N(0, width^-1/2 f); layer norms 1 and 0; linear biases 0.
    Replaying that sequence from the same seed reproduces the weights transformers 4 gives bit for bit.
    """
    from torch import nn
    from transformers.models.clipseg.modeling_clipseg import (CLIPSegAttention, CLIPSegMLP, CLIPSegModel,
                                                              CLIPSegTextEmbeddings, CLIPSegVisionEmbeddings)

    factor = model.config.initializer_factor

    def post_order(module):
        for child in module.children():
            yield from post_order(child)
        yield module

    def clipseg_scheme(module) -> None:
        if isinstance(module, CLIPSegTextEmbeddings):
            module.token_embedding.weight.normal_(0.0, 0.02 * factor)
            module.position_embedding.weight.normal_(0.0, 0.02 * factor)
        elif isinstance(module, CLIPSegVisionEmbeddings):
            module.class_embedding.normal_(0.0, module.embed_dim ** -0.5 * factor)
            module.patch_embedding.weight.normal_(0.0, module.config.initializer_range * factor)
            module.position_embedding.weight.normal_(0.0, module.config.initializer_range * factor)
        elif isinstance(module, (CLIPSegAttention, CLIPSegMLP)):
            width, depth = module.config.hidden_size, module.config.num_hidden_layers
            inner = width ** -0.5 * (2 * depth) ** -0.5 * factor
            if isinstance(module, CLIPSegAttention):
                for projection in (module.q_proj, module.k_proj, module.v_proj):
                    projection.weight.normal_(0.0, inner)
                module.out_proj.weight.normal_(0.0, width ** -0.5 * factor)
            else:
                module.fc1.weight.normal_(0.0, (2 * width) ** -0.5 * factor)
                module.fc2.weight.normal_(0.0, inner)
        elif isinstance(module, CLIPSegModel):
            module.text_projection.weight.normal_(0.0, module.text_embed_dim ** -0.5 * factor)
            module.visual_projection.weight.normal_(0.0, module.vision_embed_dim ** -0.5 * factor)
        if isinstance(module, nn.LayerNorm):
            module.reset_parameters()
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()

    for part in (model.clip, model.decoder):
        for module in part.modules():  # pre-order: a constructor's own draws come before its children's
            if isinstance(module, CLIPSegVisionEmbeddings):
                module.class_embedding.normal_()  # torch.randn in its constructor
            elif isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding, nn.LayerNorm)):
                module.reset_parameters()
        for module in post_order(part):
            clipseg_scheme(module)


def download_backbone(repo_id: str, cache_dir: str | os.PathLike | None = None, tqdm_class=None) -> Path:
    """Fetch a Hugging Face CLIPSeg repository once (safetensors and tokenizer only) and return its folder.

    With ``HF_HUB_OFFLINE=1`` only the local cache is used. ``tqdm_class`` lets a GUI show progress
    (and cancel by raising from ``update``).
    """
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=list(BACKBONE_FILES),
                                      tqdm_class=tqdm_class))
        if not (path / WEIGHTS_NAME).is_file():  # a repository from before safetensors: its pickle, read safely
            path = Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=[PICKLED_WEIGHTS_NAME],
                                          tqdm_class=tqdm_class))
        return path
    except Exception as error:  # network, auth, offline-and-not-cached: all end the same way for a user
        raise BundleError(
            f"backbone {repo_id!r} could not be downloaded or found in the cache ({error_summary(error)}). "
            f"To use it offline, download it once where there is internet "
            f"(hf download {repo_id} --local-dir DIR) and pass that folder as the backbone, "
            f"or point HF_HOME / --cache-dir at a cache that holds it"
        ) from None


def load_backbone(name: str, image_size: int = DEFAULT_IMAGE_SIZE, cache_dir: str | os.PathLike | None = None):
    """Resolve ``name`` (``tiny``, ``full-random``, a directory or a Hugging Face id) → (CLIPSeg, tokenizer)."""
    from transformers import CLIPSegForImageSegmentation

    if name in SYNTHETIC_BACKBONES:
        return build_clipseg(clipseg_architecture(name, image_size)), load_tokenizer(offline_clip_tokenizer_dir())
    directory = Path(name).expanduser()
    if not directory.is_dir():
        if name.startswith((".", "/", "~")) or name.strip("/").count("/") > 1:  # a path, not "owner/name"
            raise BundleError(f"backbone {name!r}: no such directory")
        directory = download_backbone(name, cache_dir)
    safetensors = (directory / WEIGHTS_NAME).is_file()
    if not safetensors and not (directory / PICKLED_WEIGHTS_NAME).is_file():
        raise BundleError(f"backbone {directory}: no {WEIGHTS_NAME} (or {PICKLED_WEIGHTS_NAME}) found")
    try:
        # A pickle is read by torch's weights-only unpickler (transformers passes weights_only=True), which
        # refuses anything but tensors and plain containers, so a backbone can never run code.
        model = CLIPSegForImageSegmentation.from_pretrained(str(directory), local_files_only=True,
                                                            use_safetensors=safetensors)
    except Exception as error:
        raise BundleError(f"backbone {directory}: could not load CLIPSeg weights ({error_summary(error)})") from None
    return model.eval(), load_tokenizer(directory)


def save_bundle(model, directory: str | os.PathLike, training_info: dict | None = None,
                extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` as a bundle at ``directory``, replacing any bundle there only once complete.

    ``extra_files(staging_dir)`` may add files (the trainer's resume state) that must land together
    with the weights they belong to.
    """
    from safetensors.torch import save_file

    from .card import write_model_card

    def fill(staging: Path) -> None:
        model.config.to_json_file(staging / CONFIG_NAME)
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "cotexnet_format": str(FORMAT_VERSION)})
        save_tokenizer(model.tokenizer, staging)
        if training_info is not None:
            write_json_atomic(staging / TRAINING_NAME, training_info)
        write_model_card(staging)
        if extra_files is not None:
            extra_files(staging)

    def may_replace(folder: Path) -> bool:
        return (folder / CONFIG_NAME).is_file() or not any(folder.iterdir())

    try:
        return write_folder_atomic(directory, fill, may_replace)
    except FileExistsError:
        raise BundleError(f"{directory}: exists and is not a CoTexNet bundle; refusing to overwrite it") from None


def bundle_folder(directory: str | os.PathLike, revision: str | None = None, files: tuple[str, ...] | None = None) -> Path:
    """The bundle ``directory`` names: itself, ``RUN/best`` when it is a training run folder (said once), or the
    cached snapshot of a Hugging Face Hub repository ``owner/name[@revision]`` (:mod:`cotexnet.hub`; ``files``:
    the patterns to fetch, by default everything loading needs)."""
    from .hub import DOWNLOAD_PATTERNS, resolve_model

    directory = resolve_model(directory, revision, files or DOWNLOAD_PATTERNS)
    best = directory / RUN_BEST
    if not (directory / CONFIG_NAME).is_file() and (best / CONFIG_NAME).is_file():
        if directory.resolve() not in _announced_runs:
            _announced_runs.add(directory.resolve())
            logger.info("%s is a training run folder: using its best model, %s", directory, best)
        return best
    return directory


def unreadable_bundle(error: PermissionError, directory: Path) -> BundleError:
    """A bundle another user saved owner-only: say which path and how its owner can share it."""
    return BundleError(f"{error.filename or directory}: no permission to read it; ask the owner of {directory} to "
                       f"make it readable (chmod -R a+rX {directory}) or copy the bundle somewhere you can read")


def read_bundle_config(directory: str | os.PathLike) -> CoTexNetConfig:
    """The config of a bundle (or of a run folder's best bundle, or of a Hub repository: its config and card are
    fetched, not its weights), with errors that say what is wrong."""
    from .hub import DESCRIPTION_FILES

    directory = bundle_folder(directory, files=DESCRIPTION_FILES)
    try:
        return _read_bundle_config(directory)
    except PermissionError as error:
        raise unreadable_bundle(error, directory) from None


def _read_bundle_config(directory: Path) -> CoTexNetConfig:
    if not os.access(directory, os.R_OK | os.X_OK) and directory.is_dir():
        raise unreadable_bundle(PermissionError(13, "Permission denied", str(directory)), directory)
    if not directory.exists():
        raise BundleError(f"{directory}: model bundle not found (no such directory)")
    if not directory.is_dir():
        raise BundleError(f"{directory}: a model bundle is a directory, this is a file")
    if not (directory / CONFIG_NAME).is_file():
        raise BundleError(f"{directory}: {CONFIG_NAME} is missing; this is not a CoTexNet model bundle")
    try:
        config = CoTexNetConfig.from_json_file(directory / CONFIG_NAME)
    except ConfigError as error:
        raise BundleError(str(error)) from None
    if config.backbone_config is None:
        raise BundleError(f"{directory / CONFIG_NAME}: backbone_config is missing; the bundle cannot be rebuilt offline")
    try:
        IntensityNormalization.from_dict(config.intensity)
    except ConfigError as error:  # found here, it is the bundle's fault, not that of the image segmented next
        raise BundleError(f"{directory / CONFIG_NAME}: {error}") from None
    return config


def read_bundle_weights(directory: str | os.PathLike) -> tuple[CoTexNetConfig, dict]:
    """A bundle's config and its safetensors state dict (read without unpickling anything)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = bundle_folder(directory)
    config = read_bundle_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise BundleError(f"{weights}: weights file is missing")
    try:
        state = load_file(str(weights))
    except PermissionError as error:
        raise unreadable_bundle(error, directory) from None
    except (SafetensorError, OSError, ValueError) as error:
        raise BundleError(f"{weights}: corrupt or unreadable weights ({error})") from None
    _check_finite(state, weights)
    return config, state


def _check_finite(state: dict, weights: Path) -> None:
    """Refuse NaN or infinite weights (a diverged or damaged model segments everything as background), naming
    the first tensor that holds them."""
    import torch

    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise BundleError(f"{weights}: tensor {name} holds {bad} NaN or infinite value(s) of {tensor.numel()}; "
                              f"the model cannot be used (did its training diverge?)")


def _check_state(state: dict, expected: dict, directory: Path) -> None:
    """Refuse weights that do not fit the architecture the config describes, saying which and how."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        details = "; ".join(filter(None, [
            f"missing {len(missing)} tensor(s), e.g. {missing[0]}" if missing else "",
            f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}" if unexpected else "",
            f"shape mismatch: {', '.join(mismatched[:3])}" if mismatched else "",
        ]))
        raise BundleError(f"{directory / WEIGHTS_NAME}: weights do not match {directory / CONFIG_NAME} ({details})")


class BundleMixin:
    """``save_pretrained`` / ``from_pretrained`` for a model class built as ``cls(config, backbone, tokenizer)``.

    The bundle format lives here, outside the modeling file, as transformers keeps loading and saving in
    ``PreTrainedModel`` rather than in ``modeling_*.py``; so the model never imports this module's callers.
    """

    def save_pretrained(self, directory: str | os.PathLike, training_info: dict | None = None) -> Path:
        """Write a model bundle (config.json, model.safetensors, tokenizer files, training.json) atomically."""
        return save_bundle(self, directory, training_info)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device="cpu", revision: str | None = None):
        """Load a bundle written by :meth:`save_pretrained` (or a run folder's best), without unpickling.

        ``directory`` may also be a Hub repository id ``owner/name`` (at ``revision``), downloaded once into
        the Hugging Face cache and loaded from there, offline too (:mod:`cotexnet.hub`). The architecture is
        rebuilt from the config's ``backbone_config`` and every tensor's presence and shape is checked
        before the weights are loaded.
        """
        from transformers import CLIPSegConfig

        name_or_path = str(directory)
        directory = bundle_folder(directory, revision)
        config, state = read_bundle_weights(directory)
        # from_dict adds keys to the dict it is given (transformers 4: attn_implementation); the config keeps its own
        backbone = build_clipseg(CLIPSegConfig.from_dict(copy.deepcopy(config.backbone_config)))
        try:
            tokenizer = load_tokenizer(directory)
        except PermissionError as error:
            raise unreadable_bundle(error, directory) from None
        model = cls(config, backbone=backbone, tokenizer=tokenizer)
        _check_state(state, model.state_dict(), directory)
        model.load_state_dict(state)
        model.name_or_path = name_or_path  # as transformers does: what the model was loaded from (a SEG names it)
        return model.to(device).eval()


def read_training_info(directory: str | os.PathLike) -> dict:
    path = bundle_folder(directory) / TRAINING_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def push_bundle(bundle: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                license: str | None = None, token: str | None = None) -> dict:
    """Upload a bundle (or a training run's best bundle) to a Hub model repository; returns what was pushed.

    The repository is created when missing (``private`` then applies) and the branch ``revision`` too. The card
    is rewritten first (:func:`cotexnet.card.write_model_card`, with ``license`` when given) so that it says how
    to use the model from there.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    from .card import write_model_card
    from .hub import REPO_ID, UPLOAD_FILES, parse_repo_id

    if not REPO_ID.match(repo_id):
        raise CoTexNetError(f"{repo_id}: expected a Hub repository id owner/name (letters, digits, '-', '_', '.'); "
                            f"give a branch with --revision")
    if parse_repo_id(bundle) is not None:
        raise CoTexNetError(f"{bundle}: no such folder; push takes a local bundle folder or training run folder")
    folder = bundle_folder(bundle)
    read_bundle_config(folder)  # a folder that is not a loadable bundle is refused before anything is uploaded
    write_model_card(folder, license, repo_id + (f"@{revision}" if revision else ""))  # says how to use it from there
    files = [name for name in UPLOAD_FILES if (folder / name).is_file()]
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, allow_patterns=files,
                                   commit_message=f"Upload CoTexNet model from {folder.name}")
    except HfHubHTTPError as error:
        raise CoTexNetError(f"{repo_id}: the Hub refused the upload ({error}); check the token "
                            f"(hf auth login or HF_TOKEN) and that you may write to this repository") from None
    except OSError as error:
        raise CoTexNetError(f"{repo_id}: could not reach the Hub ({type(error).__name__}: {error})") from None
    logger.info("pushed %s to %s (%s)", folder, repo_id, revision or "main")
    return {"bundle": str(folder), "repo_id": repo_id, "revision": revision or "main", "url": str(url),
            "commit": commit.oid, "files": files}


def card_summary(folder: str | os.PathLike) -> dict:
    """``{"title", "classes", "config"}`` of a bundle (a Hub id fetches only its config and card): the card's first
    heading, or the title a card would get."""
    from .card import CARD_NAME, card_title
    from .hub import DESCRIPTION_FILES

    folder = bundle_folder(folder, files=DESCRIPTION_FILES)
    config = read_bundle_config(folder)
    title = card_title(config)
    card = folder / CARD_NAME
    if card.is_file():
        heading = next((line[2:].strip() for line in card.read_text(encoding="utf-8").splitlines()
                        if line.startswith("# ")), "")
        title = heading or title
    return {"title": title, "classes": list(config.classes), "config": config}
