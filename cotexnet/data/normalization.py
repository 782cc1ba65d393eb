"""Intensity normalisation: the one place raw intensities become [0, 1], stored in every bundle."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

#: ITU-R BT.601 luma weights: a colour picture as the grayscale image a grayscale model takes (training and
#: inference alike, see ``CoTexNetConfig.channels``).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

#: CT windows as (center, width) in Hounsfield units, the usual radiology presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (60.0, 160.0),
}
_MODE_FIELDS = {
    "ct": {"mode", "window", "center", "width"},
    "percentile": {"mode", "lower", "upper"},
    "minmax": {"mode"},
    "rgb": {"mode"},
}


@dataclass
class IntensityNormalization:
    """Maps raw intensities to float32 in [0, 1]; stored in the model bundle so inference repeats it.

    Modes:
      * ``ct``: the window ``[center - width/2, center + width/2]`` (HU) mapped to [0, 1], clipped.
        ``window`` names a preset of :data:`CT_WINDOWS` (default ``soft_tissue``), or give ``center``
        and ``width`` for a custom window.
      * ``percentile``: the ``lower``/``upper`` percentiles (default 0.5/99.5) of the whole array passed
        to :meth:`apply` (pass the whole volume, not a slice) mapped to [0, 1], clipped. For MR,
        ultrasound and anything else without calibrated units.
      * ``minmax``: the array's minimum and maximum mapped to [0, 1].
      * ``rgb``: 8-bit values divided by 255.
    A constant array normalises to zeros.
    """

    mode: str = "percentile"
    window: str | None = None
    center: float | None = None
    width: float | None = None
    lower: float = 0.5
    upper: float = 99.5

    def __post_init__(self):
        if self.mode not in _MODE_FIELDS:
            raise ConfigError(f"intensity.mode: '{self.mode}' is not one of {sorted(_MODE_FIELDS)}")
        self.lower = _finite(self.lower, "intensity.lower")
        self.upper = _finite(self.upper, "intensity.upper")
        if not 0 <= self.lower < self.upper <= 100:
            raise ConfigError(
                f"intensity.lower/upper: need 0 <= lower < upper <= 100, got {self.lower} and {self.upper}"
            )
        if self.mode != "ct":
            for name in ("window", "center", "width"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"intensity.{name} only applies to mode 'ct', not '{self.mode}'")
            return
        if (self.center is None) != (self.width is None):
            raise ConfigError("intensity.center and intensity.width must be given together")
        if self.window not in (None, "custom") and self.window not in CT_WINDOWS:
            raise ConfigError(f"intensity.window: '{self.window}' is not one of {sorted(CT_WINDOWS)} or 'custom'")
        if self.center is None:
            if self.window == "custom":
                raise ConfigError("intensity.window 'custom' needs intensity.center and intensity.width")
            self.window = self.window or "soft_tissue"
            self.center, self.width = CT_WINDOWS[self.window]
            return
        self.center = _finite(self.center, "intensity.center")
        self.width = _finite(self.width, "intensity.width")
        if self.width <= 0:
            raise ConfigError(f"intensity.width must be positive, got {self.width}")
        if self.window in CT_WINDOWS and CT_WINDOWS[self.window] != (self.center, self.width):
            raise ConfigError(
                f"intensity.window '{self.window}' is {CT_WINDOWS[self.window]}, not ({self.center}, {self.width})"
            )
        self.window = self.window or "custom"

    @classmethod
    def for_modality(cls, name: str | None) -> IntensityNormalization:
        """CT -> soft-tissue window; RGB/photo -> /255; anything else (MR, MRI, US, ...) -> percentile."""
        key = (name or "").strip().lower()
        if key == "ct":
            return cls("ct", window="soft_tissue")
        if key in ("rgb", "photo"):
            return cls("rgb")
        return cls("percentile")

    def to_dict(self) -> dict:
        return {key: getattr(self, key) for key in ("mode", "window", "center", "width", "lower", "upper")
                if key in _MODE_FIELDS[self.mode]}

    @classmethod
    def from_dict(cls, data: Mapping) -> IntensityNormalization:
        if not isinstance(data, Mapping):
            raise ConfigError(f"intensity: expected a dict, got {type(data).__name__}")
        mode = data.get("mode", "percentile")
        if mode not in _MODE_FIELDS:
            raise ConfigError(f"intensity.mode: '{mode}' is not one of {sorted(_MODE_FIELDS)}")
        unknown = set(data) - _MODE_FIELDS.get(mode, set(data))
        if unknown:
            raise ConfigError(
                f"intensity.{sorted(unknown)[0]}: not a field of mode '{mode}' (fields: {sorted(_MODE_FIELDS[mode])})"
            )
        return cls(**data)

    def bounds(self, array: np.ndarray) -> tuple[float, float]:
        """The raw intensities mapped to 0 and 1 for this array (every mode is a clipped linear map).

        Inference computes them once per volume and applies the map on the device, slice batch by
        slice batch.
        """
        if self.mode == "rgb":
            return 0.0, 255.0
        if self.mode == "ct":
            return self.center - self.width / 2, self.center + self.width / 2
        values = np.asarray(array)
        if self.mode == "percentile":
            low, high = np.percentile(values, [self.lower, self.upper])
            return float(low), float(high)
        return float(values.min()), float(values.max())

    def apply(self, array: np.ndarray) -> np.ndarray:
        values = np.asarray(array, dtype=np.float32)
        low, high = self.bounds(values)
        if high <= low:
            return np.zeros_like(values)
        out = (values - np.float32(low)) / np.float32(high - low)
        return np.clip(out, 0.0, 1.0, out=out)


def _finite(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if not np.isfinite(number):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    return number
