"""Concept attributes of each class (number, shape, size, color, location) and the real-text prompt.

The coarse real-text prompt ``T_r`` of CoTexNet (docs/method.md, step 2) is built from these attributes. The
default ``geometric`` backend computes them exactly from the mask and the image in milliseconds
(:mod:`.geometric` documents every rule); ``llava`` (transformers, local GPU) and ``openai`` (any
OpenAI-compatible server) ask an LMM as the paper does, validate its answer against the vocabulary
(:mod:`.vocabulary`) and fall back to the geometric value field by field. Results can be cached in a
JSON-lines file (:mod:`.cache`). LMM libraries are imported only when such a backend is created.
"""
from .cache import ConceptCache
from .pipeline import BACKENDS, describe, format_summary, get_backend, summarize_dataset
from .vocabulary import ATTRIBUTES, FIELDS, TEMPLATE, build_prompt

__all__ = [
    "ATTRIBUTES", "BACKENDS", "FIELDS", "TEMPLATE", "ConceptCache", "build_prompt", "describe",
    "format_summary", "get_backend", "summarize_dataset",
]
