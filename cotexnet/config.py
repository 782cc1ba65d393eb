"""CoTexNet configuration: classes, backbone, method switches, and how inputs are prepared.

The config is the contract between training and inference: it travels in every model bundle as
``config.json`` so that a loaded model rebuilds the same architecture and repeats the same intensity
normalisation and slicing, with no network and no code executed from the bundle.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .atomic import write_json_atomic
from .errors import ConfigError

#: Version of the bundle/config format written by this code. Loading refuses newer versions.
FORMAT_VERSION = 1
#: The engine's version (``cotexnet.__version__``), here so that every module can name it without a cycle.
ENGINE_VERSION = "0.1.0"
#: A bundle's files (docs/bundle-format.md), named here for every module that reads or writes them.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAINING_NAME = "training.json"

# Choice lists and defaults: defined here once; the config, the trainer, the CLI and both Slicer modules
# read them from this module.
DEFAULT_BACKBONE = "CIDAS/clipseg-rd64-refined"
#: Random-init backbones built in code (cotexnet.bundle): for tests, demos and offline speed measurements.
SYNTHETIC_BACKBONES = ("tiny", "full-random")
#: CLIPSeg's native resolution, the paper's training size.
DEFAULT_IMAGE_SIZE = 352
VARIANTS = ("cotexnet", "clipseg")
#: Distillation modes of the paper's Fig. 7: full SAN-KD, without the self-added noise (no T_c mixed
#: into T'), without the alignment loss, and plain MSE fitting of T_c to T'.
KD_MODES = ("san", "no_noise", "no_align", "mse")
#: ``bernoulli``: Eq. (10) read on the sigmoid outputs, each of the 512 dimensions a Bernoulli
#: probability (default). ``softmax``: the authors' code, KL(softmax(T') || softmax(T_c)) on the
#: pre-sigmoid logits.
KL_FORMS = ("bernoulli", "softmax")
SLICE_AXES = ("axial", "coronal", "sagittal")
ATTENTIONS = ("sdpa", "eager")
#: Where real-text concept attributes come from: exact measures of the mask, a local LLaVA, or an
#: OpenAI-compatible server (see :mod:`cotexnet.concepts`).
CONCEPT_BACKENDS = ("geometric", "llava", "openai")
#: Inference/training arithmetic: ``auto`` is bf16 (fp16 without bf16) on a GPU and fp32 on the CPU.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: ``torch.compile`` modes inference may run the model under; ``reduce-overhead`` captures CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
#: Device names; ``cuda:N`` picks the N-th GPU.
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adam", "adamw")
#: What ``cotexnet evaluate`` scores: one part of the split, or every labelled case.
EVALUATION_SPLITS = ("test", "val", "train", "all")
#: Island sizes (mm3) the post-processing chooser tries per class (:mod:`cotexnet.postprocess`).
POSTPROCESSING_MIN_VOLUMES_MM3 = (10.0, 100.0, 1000.0, 10000.0)
#: Post-processing steps of one class and their types.
POSTPROCESSING_STEPS = {"largest_component": bool, "min_volume_mm3": float, "fill_holes": bool}
#: How ``segment --probabilities`` stores per-class probabilities: 0..255 in 8 bits, or 32-bit floats
#: (NIfTI, NRRD and MHA hold no 16-bit float, so half precision cannot be written as an image).
PROBABILITY_FORMATS = ("uint8", "float32")
#: Training flips: ``anatomy`` only across the patient's left-right axis with left/right classes swapped
#: (cotexnet.data.laterality); ``all`` both in-plane axes, labels untouched (blind to laterality); ``none``.
FLIP_MODES = ("anatomy", "all", "none")
#: Frozen-feature cache of the training step: ``auto`` on when it fits under the size cap, ``off`` never.
FEATURE_CACHE_MODES = ("auto", "off")
#: What a model was trained on (``CoTexNetConfig.channels``): colour pictures as they are, or their luminance.
INPUT_CHANNELS = ("grayscale", "rgb")
#: Label maps are 8-bit (class indices 0..255, 0 = background): the most classes a model or dataset may have.
MAX_CLASSES = 255
#: Which image-encoder layers train: ``none`` (the paper: frozen), ``all``, or ``last-K``.
TRAIN_ENCODER_HELP = "none, all or last-K"
#: Options set per backbone unless given (``None`` in :class:`TrainOptions`). ``paper`` suits the pretrained
#: CLIPSeg decoder (docs/method.md, "Training"); ``random`` suits the random-init backbones, where a frozen
#: random encoder is what holds the model back, so the encoder trains, at a small size and a higher rate.
RECIPES = {
    "paper": dict(image_size=DEFAULT_IMAGE_SIZE, epochs=500, batch_size=8, lr=3e-4, patience=50, train_encoder="none"),
    "random": dict(image_size=96, epochs=80, batch_size=4, lr=3e-3, patience=80, train_encoder="all"),
}

#: Colors (RGB in 0..1) given to classes in order when a config names none; distinct on Slicer's
#: dark and light backgrounds.
DEFAULT_PALETTE = (
    (0.95, 0.35, 0.25), (0.30, 0.75, 0.35), (0.25, 0.55, 0.95), (0.95, 0.80, 0.20),
    (0.70, 0.35, 0.85), (0.20, 0.80, 0.80), (0.95, 0.55, 0.75), (0.60, 0.45, 0.25),
)


@dataclass
class CoTexNetConfig:
    """Everything needed to rebuild a CoTexNet model and prepare its inputs.

    Method fields follow the paper (docs/method.md): ``alpha_init``/``sigma_init``/``mu_init`` are the
    initial values of the learnable SAN-KD scalars of Eqs. (9)–(12), ``dropout`` the rate of Eq. (11),
    and the ``use_*`` switches are the ablations of Tables 6–9.
    """

    classes: list[str]
    keywords: list[str] | None = None
    colors: list[list[float]] | None = None
    image_size: int = DEFAULT_IMAGE_SIZE
    backbone: str = DEFAULT_BACKBONE
    variant: str = "cotexnet"
    clipseg_prompt: str = "a photo of something"
    pseudo_template: str = "segmentation area of"
    use_real_text: bool = True
    use_pseudo_text: bool = True
    use_text_encoder: bool = True
    use_text_module: bool = True
    kd_mode: str = "san"
    kl_form: str = "bernoulli"
    kd_weight: float = 1.0
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    alpha_init: float = 0.2
    sigma_init: float = 1.0
    mu_init: float = -0.002
    dropout: float = 0.2
    attention: str = "sdpa"
    slice_axis: str = "axial"
    modality: str = "MR"
    intensity: dict[str, Any] = field(default_factory=lambda: {"mode": "percentile", "lower": 0.5, "upper": 99.5})
    #: What training fed the model, so inference feeds the same: ``rgb`` (colour pictures as they are,
    #: grayscale images in all three channels) or ``grayscale`` (colour pictures as their luminance).
    #: ``None`` (bundles from before this field): ``rgb`` exactly when the intensity mode is ``rgb``.
    channels: str | None = None
    #: Views whose class probabilities inference averages (``None``: ``slice_axis`` alone); a
    #: recommendation that ``--planes`` overrides.
    planes: list[str] | None = None
    #: Per class name, the 3D post-processing steps chosen on validation (``None``: none chosen).
    postprocessing: dict[str, dict[str, Any]] | None = None
    #: Per class name, DICOM codes for SEG output, ``{"category": [value, scheme, meaning], "type": [...]}``
    #: (``None``: SNOMED CT for names DICOM knows, else generic tissue; :mod:`cotexnet.dicom_seg`).
    segment_codes: dict[str, dict[str, list[str]]] | None = None
    #: transformers ``CLIPSegConfig.to_dict()`` of the backbone, recorded so a bundle rebuilds the
    #: architecture without fetching the backbone again.
    backbone_config: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if isinstance(self.classes, str) or not isinstance(self.classes, (list, tuple)) or not self.classes:
            raise ConfigError(f"classes: expected a non-empty list of class names, got {self.classes!r}")
        self.classes = [self._name("classes", c) for c in self.classes]
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes: names must be unique, got {self.classes}")
        if len(self.classes) > MAX_CLASSES:
            raise ConfigError(f"classes: at most {MAX_CLASSES} (label maps hold 8-bit class indices), got "
                              f"{len(self.classes)}")
        if self.keywords is None:
            self.keywords = list(self.classes)
        self.keywords = [self._name("keywords", k) for k in self.keywords]
        if len(self.keywords) != len(self.classes):
            raise ConfigError(
                f"keywords: expected one keyword per class ({len(self.classes)}), got {len(self.keywords)}"
            )
        if self.colors is None:
            self.colors = [list(DEFAULT_PALETTE[i % len(DEFAULT_PALETTE)]) for i in range(len(self.classes))]
        self.colors = [self._color(c) for c in self.colors]
        if len(self.colors) != len(self.classes):
            raise ConfigError(f"colors: expected one color per class ({len(self.classes)}), got {len(self.colors)}")
        self._check_choice("variant", VARIANTS)
        self._check_choice("kd_mode", KD_MODES)
        self._check_choice("kl_form", KL_FORMS)
        self._check_choice("slice_axis", SLICE_AXES)
        self._check_choice("attention", ATTENTIONS)
        if self.channels is not None:
            self._check_choice("channels", INPUT_CHANNELS)
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or not 16 <= self.image_size <= 2048:
            raise ConfigError(f"image_size: expected an integer from 16 to 2048, got {self.image_size!r}")
        for name in ("use_real_text", "use_pseudo_text", "use_text_encoder", "use_text_module"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        for name in ("kd_weight", "dice_weight", "ce_weight", "alpha_init", "sigma_init", "mu_init", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("kd_weight", "dice_weight", "ce_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected a weight >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.alpha_init <= 1.0:
            raise ConfigError(f"alpha_init: expected a value in [0, 1], got {self.alpha_init}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: expected a rate in [0, 1), got {self.dropout}")
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ConfigError(f"backbone: expected 'tiny', a Hugging Face id or a directory, got {self.backbone!r}")
        if self.use_real_text and not self.use_text_encoder and self.use_text_module:
            raise ConfigError(
                "use_real_text: real-text prompts need the text encoder; set use_real_text to false "
                "when use_text_encoder is false"
            )
        if self.planes is not None:
            self.planes = validate_planes(self.planes)
        if self.postprocessing is not None:
            self.postprocessing = validate_postprocessing(self.postprocessing, self.classes)
        if self.segment_codes is not None:
            self.segment_codes = validate_segment_codes(self.segment_codes, self.classes)
        if not isinstance(self.intensity, dict) or "mode" not in self.intensity:
            raise ConfigError(f"intensity: expected a dict with a 'mode' key, got {self.intensity!r}")
        if not isinstance(self.format_version, int) or self.format_version < 1:
            raise ConfigError(f"format_version: expected a positive integer, got {self.format_version!r}")

    @staticmethod
    def _name(field_name: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{field_name}: expected non-empty strings, got {value!r}")
        return value.strip()

    @staticmethod
    def _color(value: Any) -> list[float]:
        ok = isinstance(value, (list, tuple)) and len(value) == 3
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in value)
        if not ok:
            raise ConfigError(f"colors: expected [r, g, b] with each value in 0..1, got {value!r}")
        return [float(v) for v in value]

    def _check_choice(self, name: str, choices: tuple[str, ...]):
        if getattr(self, name) not in choices:
            raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {getattr(self, name)!r}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def color_input(self) -> bool:
        """Whether the model takes colour pictures as colour (else as their luminance); see ``channels``."""
        if self.channels is None:
            return self.intensity.get("mode") == "rgb"
        return self.channels == "rgb"

    @property
    def uses_text_encoder_in_training(self) -> bool:
        """Whether training runs CLIP's text encoder (the eval path never does for ``cotexnet``)."""
        return self.variant == "clipseg" or (self.use_text_module and self.use_text_encoder)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values; optional fields added after the first release are left out while
        unset, so a bundle that does not use them is written exactly as that release wrote it."""
        data = asdict(self)
        for name in ("planes", "postprocessing", "segment_codes", "channels"):
            if data[name] is None:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "CoTexNetConfig":
        """Build a config from a dict, refusing unknown keys and newer formats with a clear message."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version", 1)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ConfigError(
                f"{source}: format_version {version} is newer than this version of CoTexNet understands "
                f"({FORMAT_VERSION}); update the cotexnet package"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        if "classes" not in data:
            raise ConfigError(f"{source}: missing field 'classes'")
        try:
            return cls(**data)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write the config as JSON atomically (temporary file, then rename)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "CoTexNetConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        return cls.from_dict(data, source=str(path))


def validate_planes(planes) -> list[str]:
    """A non-empty list of distinct view names (a comma-separated string is split)."""
    if isinstance(planes, str):
        planes = [p.strip() for p in planes.split(",") if p.strip()]
    if not isinstance(planes, (list, tuple)) or not planes:
        raise ConfigError(f"planes: expected a non-empty list of {', '.join(SLICE_AXES)}, got {planes!r}")
    unknown = [p for p in planes if p not in SLICE_AXES]
    if unknown:
        raise ConfigError(f"planes: {unknown[0]!r} is not one of {', '.join(SLICE_AXES)}")
    if len(set(planes)) != len(planes):
        raise ConfigError(f"planes: each view at most once, got {list(planes)}")
    return list(planes)


def validate_postprocessing(choice, classes) -> dict[str, dict[str, Any]]:
    """``{class name: {largest_component, min_volume_mm3, fill_holes}}`` for known classes, types checked."""
    if not isinstance(choice, dict):
        raise ConfigError(f"postprocessing: expected an object keyed by class name, got {type(choice).__name__}")
    checked = {}
    for name, steps in choice.items():
        if name not in classes:
            raise ConfigError(f"postprocessing: {name!r} is not one of the classes {list(classes)}")
        if not isinstance(steps, dict) or set(steps) - set(POSTPROCESSING_STEPS):
            raise ConfigError(f"postprocessing[{name!r}]: expected keys among {', '.join(POSTPROCESSING_STEPS)}, "
                              f"got {steps!r}")
        out = {"largest_component": False, "min_volume_mm3": 0.0, "fill_holes": False}
        for key, value in steps.items():
            if POSTPROCESSING_STEPS[key] is bool and not isinstance(value, bool):
                raise ConfigError(f"postprocessing[{name!r}].{key}: expected true or false, got {value!r}")
            if POSTPROCESSING_STEPS[key] is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                    raise ConfigError(f"postprocessing[{name!r}].{key}: expected a volume >= 0 in mm3, got {value!r}")
                value = float(value)
            out[key] = value
        checked[name] = out
    return checked


def validate_segment_codes(codes, classes) -> dict[str, dict[str, list[str]]]:
    """``{class name: {"category": [value, scheme, meaning], "type": [...]}}`` for known classes."""
    if not isinstance(codes, dict):
        raise ConfigError(f"segment_codes: expected an object keyed by class name, got {type(codes).__name__}")
    for name, entry in codes.items():
        if name not in classes:
            raise ConfigError(f"segment_codes: {name!r} is not one of the classes {list(classes)}")
        ok = isinstance(entry, dict) and set(entry) == {"category", "type"} and all(
            isinstance(code, (list, tuple)) and len(code) == 3 and all(isinstance(v, str) and v for v in code)
            for code in entry.values())
        if not ok:
            raise ConfigError(f"segment_codes[{name!r}]: expected {{\"category\": [value, scheme, meaning], \"type\": "
                              f"[value, scheme, meaning]}} (e.g. [\"10200004\", \"SCT\", \"Liver\"]), got {entry!r}")
    return {name: {key: list(code) for key, code in entry.items()} for name, entry in codes.items()}


@dataclass
class TrainOptions:
    """Everything ``cotexnet train`` accepts, with the paper's defaults (docs/method.md, "Training").

    ``config_overrides`` sets any :class:`CoTexNetConfig` field (ablation switches, ``kd_mode``,
    ``kd_weight``, ``variant`` …). The CLI takes its defaults from these fields.
    """

    data: str
    out: str
    classes: list[str] | None = None
    keywords: list[str] | None = None
    backbone: str = DEFAULT_BACKBONE
    cache_dir: str | None = None
    #: ``None``: from the backbone's recipe (:data:`RECIPES`, :func:`recipe_name`).
    image_size: int | None = None
    epochs: int | None = None
    #: ``"auto"``: on a GPU, the largest batch whose step fits half the free memory (measured); the recipe's elsewhere.
    batch_size: int | str | None = None
    #: ``torch.compile`` mode of the step's text encoder and decoder (:meth:`CoTexNet.compile_training`); None: eager.
    compile: str | None = None
    #: Batches whose gradients one optimiser step sums: an effective batch of ``accumulate x batch_size`` on a
    #: device too small for it (out of GPU memory, the trainer halves the batch and doubles this by itself).
    accumulate: int = 1
    lr: float | None = None
    train_encoder: str | None = None
    optimizer: str = "adam"
    weight_decay: float = 0.0
    patience: int | None = None
    device: str = "auto"
    seed: int = 0
    grad_clip: float = 1.0
    augment: bool = True
    flips: str = "anatomy"
    #: Share of each batch drawn from slices holding a class (nnU-Net's foreground oversampling); 0 turns it off.
    oversample: float = 0.33
    feature_cache: str = "auto"
    #: Augmented views per slice kept in the feature cache (one without augmentation).
    views: int = 4
    #: Size cap of the feature cache on disk; beyond it the step encodes on the fly (in GPU memory, half the free
    #: memory is the cap).
    cache_limit_gb: float = 8.0
    #: A bundle (or run folder) whose weights start this run: same classes, or matched by name.
    init_from: str | None = None
    empty_fraction: float = 0.1
    slice_axis: str = "axial"
    modality: str | None = None
    intensity: dict | None = None
    concept_backend: str = "geometric"
    concept_options: dict = field(default_factory=dict)
    concept_cache: str | None = None
    attributes: list[str] | None = None
    max_steps_per_epoch: int | None = None
    num_workers: int = 0
    progress_file: str | None = None
    progress_stdout: bool = False
    show_progress: bool = True
    stop_file: str | None = None
    resume: bool = False
    overwrite: bool = False
    config_overrides: dict = field(default_factory=dict)
    #: The recipe that filled the options left at ``None`` (set on construction).
    recipe: str | None = None

    def __post_init__(self):
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other: continue the run in out, or replace it")
        self.recipe = recipe_name(self.backbone)
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        encoder = self.train_encoder
        last = encoder.startswith("last-") and encoder[5:].isdigit() and int(encoder[5:]) > 0
        if encoder not in ("none", "all") and not last:
            raise ConfigError(f"train_encoder: expected {TRAIN_ENCODER_HELP}, got {encoder!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ConfigError(f"compile: expected one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        for name, choices in (("flips", FLIP_MODES), ("feature_cache", FEATURE_CACHE_MODES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.oversample <= 1.0:
            raise ConfigError(f"oversample: expected a share in [0, 1], got {self.oversample!r}")
        if not isinstance(self.views, int) or self.views < 1:
            raise ConfigError(f"views: expected a positive integer, got {self.views!r}")
        for name in ("epochs", "batch_size", "accumulate", "patience", "image_size", "max_steps_per_epoch"):
            value = getattr(self, name)
            if name == "batch_size" and value == "auto":
                continue
            if (value is not None or name != "max_steps_per_epoch") and not _integer_at_least(value, 1):
                also = " or 'auto'" if name == "batch_size" else ""
                raise ConfigError(f"{name}: expected a positive integer{also}, got {value!r}")
        for name, top in (("seed", 2**32 - 1), ("num_workers", None)):  # numpy seeds are 32-bit
            value = getattr(self, name)
            if not _integer_at_least(value, 0) or (top is not None and value > top):
                allowed = f"from 0 to {top}" if top is not None else ">= 0"
                raise ConfigError(f"{name}: expected an integer {allowed}, got {value!r}")
        if not _finite_at_least(self.lr, 0.0) or self.lr == 0:
            raise ConfigError(f"lr: expected a finite positive number, got {self.lr!r}")
        for name in ("weight_decay", "grad_clip", "cache_limit_gb"):
            if not _finite_at_least(getattr(self, name), 0.0):
                raise ConfigError(f"{name}: expected a finite number >= 0, got {getattr(self, name)!r}")
        for name, choices in (("optimizer", OPTIMIZERS), ("slice_axis", SLICE_AXES),
                              ("concept_backend", CONCEPT_BACKENDS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {getattr(self, name)!r}")


def _integer_at_least(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _finite_at_least(value, low: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


def recipe_name(backbone: str) -> str:
    """``random`` for the random-init backbones (``tiny``, ``full-random``), ``paper`` for pretrained CLIPSeg."""
    return "random" if backbone in SYNTHETIC_BACKBONES else "paper"
