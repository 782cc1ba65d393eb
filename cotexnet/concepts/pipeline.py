"""Describe the classes of one case, or of a whole dataset, through a backend and the cache."""
from __future__ import annotations

import inspect
from collections import Counter
from typing import Iterable

from ..config import CONCEPT_BACKENDS as BACKENDS
from ..errors import ConfigError, DataError
from .cache import ConceptCache, open_cache
from .geometric import GeometricBackend, measure_classes
from .scene import Scene
from .vocabulary import ATTRIBUTES, FIELDS, build_prompt

RECORD_KEYS = (
    "class", "label", "keyword", "count", *FIELDS, "prompt", "sources", "reasons", "provisional", "measures",
)


def get_backend(backend="geometric", **options):
    """A backend object from its name and options (``model=``, ``base_url=`` …); objects pass through.

    ``llava`` takes the options of :class:`~.llava.LlavaBackend`, ``openai`` those of
    :class:`~.http.OpenAIBackend`; the geometric backend takes none.
    """
    if not isinstance(backend, str):
        if options:
            raise ConfigError(f"backend options {sorted(options)} given with a ready backend object")
        return backend
    if backend == "geometric":
        factory = GeometricBackend
    elif backend == "llava":
        from .llava import LlavaBackend as factory
    elif backend == "openai":
        from .http import OpenAIBackend as factory
    else:
        raise ConfigError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as error:
        raise ConfigError(f"backend {backend!r}: {error}") from None
    return factory(**options)


def resolve_attributes(attributes=None) -> tuple[str, ...]:
    """The attributes kept in prompts, in template order; None keeps all (:data:`ATTRIBUTES`)."""
    if attributes is None:
        return ATTRIBUTES
    if isinstance(attributes, str):
        attributes = [attributes]
    unknown = sorted(set(attributes) - set(ATTRIBUTES))
    if unknown:
        raise ConfigError(f"attributes: unknown {', '.join(unknown)}; expected some of {', '.join(ATTRIBUTES)}")
    return tuple(a for a in ATTRIBUTES if a in attributes)


def _names(classes, keywords) -> tuple[list[str], list[str]]:
    if isinstance(classes, str) or not classes:
        raise ConfigError(f"classes: expected a non-empty list of class names, got {classes!r}")
    keywords = list(classes) if keywords is None else list(keywords)
    if len(keywords) != len(classes):
        raise ConfigError(f"keywords: expected one keyword per class ({len(classes)}), got {len(keywords)}")
    return list(classes), keywords


def describe(
    image,
    label_map,
    classes,
    keywords=None,
    backend="geometric",
    spacing=None,
    direction=None,
    *,
    attributes=None,
    cache=None,
    **backend_options,
) -> list[dict]:
    """Concept attributes and the real-text prompt of each class, one dict per class in class order.

    ``image``: (y, x) grayscale, (y, x, 3) RGB or a (z, y, x) volume; ``label_map``: same spatial
    shape, class ``i`` (0-based) stored as ``i + 1`` (a single class may be any non-zero mask).
    ``spacing``/``direction``: SimpleITK order, ``(x, y[, z])`` and a row-major 3×3 LPS matrix.
    ``backend``: ``"geometric"``, ``"llava"``, ``"openai"`` (options as keywords) or a backend
    object. ``attributes``: those to keep in the prompt (default all of :data:`ATTRIBUTES`).
    ``cache``: a JSONL path or :class:`ConceptCache`.

    Each dict holds ``class``, ``label``, ``keyword``, ``count`` (components), the words ``number``,
    ``shape``, ``size``, ``color``, ``location`` (None when left out or the class is absent),
    ``prompt``, ``sources`` (the backend that produced each field), ``reasons`` (why a field is not
    the backend's plain answer), ``provisional`` (an LMM gave no answer, so geometric values stand in;
    kept in memory for this run, never written to the cache file) and the geometric ``measures``.
    """
    classes, keywords = _names(classes, keywords)
    attributes = resolve_attributes(attributes)
    fields = tuple(f for f in FIELDS if f in attributes)
    scene = Scene(image, label_map, len(classes), spacing, direction)
    backend = get_backend(backend, **backend_options)
    cache = open_cache(cache)
    keys = [None] * len(classes)
    records = [None] * len(classes)
    if cache is not None:
        for i, (name, keyword) in enumerate(zip(classes, keywords)):
            keys[i] = ConceptCache.key(scene.content_hash, name, keyword, backend.id, attributes)
            records[i] = cache.get(keys[i])
    missing = [i for i, record in enumerate(records) if record is None]
    if not missing:
        return records
    for i, measured in zip(missing, measure_classes(scene, [i + 1 for i in missing])):
        record = {
            "class": classes[i], "label": i + 1, "keyword": keywords[i], **measured,
            "sources": {f: "geometric" for f in fields}, "reasons": {}, "provisional": False,
        }
        record.update({f: None for f in FIELDS if f not in fields})
        record = backend.refine(scene, record, keywords[i], fields)
        record["prompt"] = build_prompt(record, keywords[i], attributes)
        record = {key: record[key] for key in RECORD_KEYS}
        if cache is not None:
            context = {"case": scene.content_hash, "class": classes[i], "backend": backend.id,
                       "attributes": list(attributes)}
            # A provisional record (the LMM gave no answer) serves this run only: the next run asks again.
            cache.put(keys[i], record, context, persist=not record["provisional"])
        records[i] = record
    return records


def summarize_dataset(
    cases: Iterable,
    keywords,
    classes,
    backend="geometric",
    cache=None,
    attributes=None,
    progress: bool = True,
    **backend_options,
) -> dict:
    """Describe every case (filling the cache) and count how often each attribute word occurs.

    ``cases`` yields ``(case_id, image, label_map, spacing, direction)``. Returns ``cases``,
    ``backend``, ``attributes``, ``values`` (``{field: {word: count}}`` over present classes),
    ``classes`` (per class: ``present``, ``absent`` and its own ``values``), ``fallbacks`` (fields
    an LMM answered invalidly or not at all, by field), ``provisional`` (class records the LMM gave no
    answer for; asked again next run) and ``cache`` (path, this run's hits and misses, entries).
    """
    from tqdm.auto import tqdm

    classes, keywords = _names(classes, keywords)
    attributes = resolve_attributes(attributes)
    fields = [f for f in FIELDS if f in attributes]
    backend = get_backend(backend, **backend_options)
    cache = open_cache(cache)
    hits, misses = (cache.hits, cache.misses) if cache is not None else (0, 0)
    totals = {f: Counter() for f in fields}
    per_class = {name: {"present": 0, "absent": 0, "values": {f: Counter() for f in fields}} for name in classes}
    fallbacks = Counter()
    done = provisional = 0
    bar = tqdm(cases, desc="concepts", unit="case", total=len(cases) if hasattr(cases, "__len__") else None,
               disable=not progress)
    for case_id, image, label_map, spacing, direction in bar:
        try:
            records = describe(
                image, label_map, classes, keywords, backend, spacing, direction, attributes=attributes, cache=cache
            )
        except DataError as error:
            raise DataError(str(error), path=case_id) from None
        done += 1
        provisional += sum(record["provisional"] for record in records)
        for record in records:
            stats = per_class[record["class"]]
            if record["count"] == 0:
                stats["absent"] += 1
                continue
            stats["present"] += 1
            for f in fields:
                totals[f][record[f]] += 1
                stats["values"][f][record[f]] += 1
            fallbacks.update(f for f in record["reasons"] if record["sources"].get(f) == "geometric")
    return {
        "cases": done,
        "backend": backend.id,
        "attributes": list(attributes),
        "values": _plain(totals),
        "classes": {name: {**stats, "values": _plain(stats["values"])} for name, stats in per_class.items()},
        "fallbacks": dict(fallbacks),
        "provisional": provisional,
        "cache": None if cache is None else {
            "path": str(cache.path), "hits": cache.hits - hits, "misses": cache.misses - misses, "entries": len(cache),
        },
    }


def _plain(counters: dict[str, Counter]) -> dict[str, dict[str, int]]:
    """Counters as plain dicts, most frequent word first (JSON friendly)."""
    return {field: dict(counter.most_common()) for field, counter in counters.items()}


def format_summary(summary: dict) -> str:
    """A plain-text table of a :func:`summarize_dataset` result: one row per attribute word."""
    classes = list(summary["classes"])
    stats = summary["classes"]

    def row(field: str, word: str, counts: list[int]) -> tuple:
        return (field, word, *counts, *([sum(counts)] if len(classes) > 1 else []))

    header = ("attribute", "value", *classes, *(["all"] if len(classes) > 1 else []))
    rows = [header, row("classes", "present", [stats[c]["present"] for c in classes])]
    rows.append(row("", "absent", [stats[c]["absent"] for c in classes]))
    for field, words in summary["values"].items():
        for n, word in enumerate(words):
            counts = [stats[c]["values"][field].get(word, 0) for c in classes]
            rows.append(row(field if n == 0 else "", word, counts))
    widths = [max(len(str(r[k])) for r in rows) for k in range(len(header))]
    lines = [f"Concept attributes of {summary['cases']} case(s), backend {summary['backend']}"]
    for r in rows:  # words left-aligned, counts right-aligned
        cells = [str(v).ljust(w) if k < 2 else str(v).rjust(w) for k, (v, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    if summary["fallbacks"]:
        counts = ", ".join(f"{field} {n}" for field, n in summary["fallbacks"].items())
        lines.append(f"LMM answers replaced by geometric values: {counts}")
    if summary["provisional"]:
        lines.append(f"{summary['provisional']} class record(s) got no LMM answer: not cached, asked again next run")
    if summary["cache"]:
        cache = summary["cache"]
        lines.append(
            f"cache {cache['path']}: {cache['entries']} entries, {cache['hits']} reused, {cache['misses']} new"
        )
    return "\n".join(lines)
