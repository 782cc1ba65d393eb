"""CoTexNet: segmentation with text prompts learned from regions of interest (engine, no Slicer imports).

Heavy modules (torch, transformers) load on first use, so ``import cotexnet`` stays cheap for tools
that only need the config or the concept attributes.
"""
from .config import ENGINE_VERSION, CoTexNetConfig
from .errors import BundleError, Cancelled, CoTexNetError, ConfigError, DataError

__version__ = ENGINE_VERSION
__all__ = ["CoTexNet", "CoTexNetConfig", "segment_volume", "describe", "CoTexNetError", "ConfigError",
           "BundleError", "DataError", "Cancelled", "__version__"]


def __getattr__(name):
    if name == "CoTexNet":
        from .model import CoTexNet

        return CoTexNet
    if name == "segment_volume":
        from .infer import segment_volume

        return segment_volume
    if name == "describe":
        from .concepts import describe

        return describe
    raise AttributeError(f"module 'cotexnet' has no attribute {name!r}")
