"""What LMM backends share: the question, parsing, validation, retries and the geometric fallback.

An LMM sees the ROI image ``R_i = I * M_i`` (docs/method.md, step 1; everything outside the class blacked out,
grayscale shown over its 1st–99th percentile range) and is asked for a JSON object holding the
requested attributes, each from the vocabulary (:mod:`.vocabulary`). Its answer is parsed and each
field validated; ``number`` is capped at the mask's connected-component count. Invalid fields are
asked again (up to ``retries`` more times, sampling with temperature 0.7 after the first, greedy,
try). A field that stays invalid keeps the geometric value, and the reason is logged and recorded
in the record's ``reasons``; when the last try got no answer at all (:class:`LMMUnavailableError`) the
record is also marked ``provisional``, so the cache never keeps the fallback as the LMM's answer. LMMs see 2D
images only: a volume is described geometrically.
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np

from ..errors import ConfigError, CoTexNetError
from .scene import Scene
from .vocabulary import choices, validate

logger = logging.getLogger("cotexnet.concepts")

RETRY_TEMPERATURE = 0.7


class LMMRequestError(CoTexNetError):
    """One request to an LMM failed (server error, timeout, unreadable reply); it may be retried."""


class LMMUnavailableError(LMMRequestError):
    """The LMM gave no answer at all (unreachable, timed out, HTTP error, unreadable reply).

    Unlike an answer it gave that failed validation, this says nothing about the image: a record whose
    fields fell back for this reason is provisional and is asked again in a later run.
    """


class LMMBackend:
    """Base of the LMM backends; subclasses implement :meth:`ask` and set ``name`` and ``model``."""

    name = "lmm"

    def __init__(self, model: str, retries: int = 2, backoff: float = 1.0):
        if not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries: expected a whole number >= 0, got {retries!r}")
        self.model = model
        self.retries = retries
        self.backoff = backoff

    @property
    def id(self) -> str:
        """Names the answers' origin in cache keys."""
        return f"{self.name}:{self.model}"

    def ask(self, image: np.ndarray, question: str, temperature: float) -> str:
        """Send one (H, W, 3) uint8 image and a question; return the model's text."""
        raise NotImplementedError

    def refine(self, scene: Scene, record: dict, keyword: str, fields: tuple[str, ...]) -> dict:
        """Replace the geometric values of ``fields`` with the LMM's valid answers."""
        if not fields or record["count"] == 0:
            return record
        record = {**record, "sources": dict(record["sources"]), "reasons": dict(record["reasons"])}
        if scene.ndim == 3:
            for field in fields:
                record["reasons"][field] = f"{self.name} describes 2D images only; volumes are described geometrically"
            return record
        image = roi_image(scene, record["label"])
        question = build_question(keyword, fields, scene.grayscale)
        pending, why, unanswered = list(fields), {}, False
        for attempt in range(self.retries + 1):
            try:
                answer = parse_answer(self.ask(image, question, 0.0 if attempt == 0 else RETRY_TEMPERATURE))
            except LMMRequestError as error:
                why = {field: str(error) for field in pending}
                unanswered = isinstance(error, LMMUnavailableError)
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
                continue
            unanswered = False
            for field in list(pending):
                word, note = validate(field, answer.get(field), count=record["count"], grayscale=scene.grayscale)
                if word is None:
                    why[field] = note
                    continue
                record[field] = word
                record["sources"][field] = self.name
                pending.remove(field)
                if note:
                    record["reasons"][field] = note
            if not pending:
                break
        for field in pending:
            reason = f"{why[field]} (after {self.retries + 1} tries); kept the geometric value {record[field]!r}"
            record["reasons"][field] = reason
            logger.warning("%s: class %r %s: %s", self.id, record["class"], field, reason)
        record["provisional"] = bool(pending) and unanswered
        return record


def build_question(keyword: str, fields: tuple[str, ...], grayscale: bool) -> str:
    """The instruction sent with the ROI image, listing the allowed words of each field."""
    lines = [
        f"The image shows the {keyword} area of a medical image; everything else is blacked out.",
        "Describe it as a JSON object with exactly these keys:",
    ]
    for field in fields:
        if field == "number":
            lines.append(f'"number": how many separate {keyword} areas there are, as an integer;')
        else:
            words = ", ".join(choices(field, grayscale))
            hint = {"size": " (relative to the whole image)", "location": " (where in the image)"}.get(field, "")
            lines.append(f'"{field}": one of {words}{hint};')
    lines.append("Answer with the JSON object only.")
    return "\n".join(lines)


def parse_answer(text: str) -> dict:
    """The first JSON object in the model's text, keys lower-cased."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return {str(k).strip().lower(): v for k, v in value.items()}
        start = text.find("{", start + 1)
    raise LMMRequestError(f"no JSON object in the answer {text[:80]!r}")


def roi_image(scene: Scene, label: int) -> np.ndarray:
    """``I * M`` as (H, W, 3) uint8: the class's pixels, everything else black."""
    if scene.grayscale:
        low, high = scene.intensity_range
        unit = np.clip((scene.gray - low) / ((high - low) or 1.0), 0, 1)
        rgb = np.repeat(unit[..., None], 3, axis=-1)
    else:
        rgb = scene.rgb
    return (np.round(rgb * 255) * (scene.classes == label)[..., None]).astype(np.uint8)
