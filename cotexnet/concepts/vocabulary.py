"""The words concept attributes may take, how LMM answers map onto them, and the prompt template.

Every backend produces words from this vocabulary only, so that prompts stay within what the model
saw in training and what a clinician reads in Slicer is predictable:

========  ============================================================================================
number    ``no`` (class absent), ``one`` … ``five``, ``multiple`` (six or more components)
shape     ``round``, ``oval``, ``elongated``, ``irregular``, ``ring-shaped``
size      ``tiny``, ``small``, ``medium``, ``large`` (share of the image, see ``geometric``)
color     RGB images: ``red``, ``orange``, ``yellow``, ``green``, ``blue``, ``purple``, ``pink``,
          ``brown``, ``white``, ``gray``, ``black``; grayscale images and volumes: ``dark``,
          ``gray``, ``bright`` (darker than, like, or brighter than the surroundings)
location  2D: ``top left``, ``top``, ``top right``, ``left``, ``center``, ``right``,
          ``bottom left``, ``bottom``, ``bottom right``; 3D: patient directions in the order
          left/right, anterior/posterior, superior/inferior (e.g. ``left anterior``), or ``center``
========  ============================================================================================

The real-text prompt (docs/method.md, step 2) is exactly
``"{number} {shape} {size} {color} {keyword} area, located in the {location} of the image."``; an
absent class reads ``"no {keyword} area in the image."``. Attributes left out (the Fig. 6 ablation)
are dropped from the sentence with their word.
"""
from __future__ import annotations

import re
from typing import Any

#: Attributes a prompt can hold; any of them can be left out (paper Fig. 6).
ATTRIBUTES = ("number", "shape", "size", "color", "location", "keyword")
#: Attributes computed per class (``keyword`` is given by the user).
FIELDS = ("number", "shape", "size", "color", "location")

TEMPLATE = "{number} {shape} {size} {color} {keyword} area, located in the {location} of the image."
ABSENT_TEMPLATE = "no {keyword} area in the image."

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five")
MANY = "multiple"
SHAPES = ("round", "oval", "elongated", "irregular", "ring-shaped")
SIZES = ("tiny", "small", "medium", "large")
RGB_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "white", "gray", "black")
GRAY_COLORS = ("dark", "gray", "bright")
LOCATIONS_2D = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
#: Patient axes of a 3D location, each as (word for the negative LPS side, word for the positive side).
PATIENT_AXES = (("right", "left"), ("anterior", "posterior"), ("inferior", "superior"))

_COUNT_WORDS = {w: i for i, w in enumerate(NUMBER_WORDS)} | {
    "single": 1, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}
_SYNONYMS = {
    "shape": {
        "circular": "round", "circle": "round", "spherical": "round", "rounded": "round",
        "ovoid": "oval", "elliptical": "oval", "ellipsoid": "oval", "ellipse": "oval", "oval-shaped": "oval",
        "long": "elongated", "linear": "elongated", "tubular": "elongated", "elongate": "elongated",
        "lobulated": "irregular", "amorphous": "irregular", "irregularly shaped": "irregular",
        "ring": "ring-shaped", "annular": "ring-shaped", "ring shaped": "ring-shaped",
    },
    "size": {
        "very small": "tiny", "minute": "tiny", "little": "small", "moderate": "medium",
        "medium-sized": "medium", "intermediate": "medium", "big": "large", "huge": "large",
        "very large": "large",
    },
    "color": {
        "grey": "gray", "reddish": "red", "pinkish": "pink", "brownish": "brown", "yellowish": "yellow",
        "greenish": "green", "bluish": "blue", "violet": "purple", "purplish": "purple", "orangish": "orange",
    },
    "gray-color": {
        "black": "dark", "darker": "dark", "white": "bright", "brighter": "bright", "light": "bright",
        "grey": "gray", "intermediate": "gray",
    },
}
_LOCATION_WORDS = {
    "top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom", "left": "left", "right": "right",
    "center": "center", "centre": "center", "middle": "center", "central": "center",
}
_LOCATION_FILLER = {"the", "of", "in", "part", "image", "corner", "side", "region", "area", "and", "at", "quadrant"}


def number_word(count: int) -> str:
    """The word for ``count`` connected components: ``no``, ``one`` … ``five``, then ``multiple``."""
    return NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else MANY


def location_3d(sides: tuple[int, int, int]) -> str:
    """Words for the sign (-1, 0, +1) of the offset along L, P and S: ``(1, -1, 0)`` is ``left anterior``."""
    words = [axis[0] if side < 0 else axis[1] for axis, side in zip(PATIENT_AXES, sides) if side]
    return " ".join(words) or "center"


def choices(field: str, grayscale: bool) -> tuple[str, ...]:
    """The words ``field`` may take for a 2D image (what an LMM is offered)."""
    return {
        "shape": SHAPES, "size": SIZES, "location": LOCATIONS_2D,
        "color": GRAY_COLORS if grayscale else RGB_COLORS,
    }[field]


def validate(field: str, value: Any, *, count: int, grayscale: bool) -> tuple[str | None, str | None]:
    """Map an LMM's answer for ``field`` onto the vocabulary of a 2D image.

    Returns ``(word, note)``: ``word`` is None when the answer is unusable and ``note`` says why; a
    valid answer may carry a note too (a number capped at the ``count`` connected components).
    """
    if value is None:
        return None, f"no {field!r} in the answer"
    if field == "number":
        return _validate_number(value, count)
    if not isinstance(value, str):
        return None, f"{field} {value!r} is not a word"
    text = re.sub(r"\s+", " ", value.strip().lower().replace("_", " ")).strip(" .")
    if field == "location":
        word = _normalize_location(text)
    else:
        synonyms = _SYNONYMS["gray-color" if field == "color" and grayscale else field]
        word = synonyms.get(text, text)
    allowed = choices(field, grayscale)
    if word not in allowed:
        return None, f"{field} {value!r} is not one of: {', '.join(allowed)}"
    return word, None


def _validate_number(value: Any, count: int) -> tuple[str | None, str | None]:
    if isinstance(value, bool):
        n = None
    elif isinstance(value, (int, float)):
        n = int(value) if float(value).is_integer() else None
    elif isinstance(value, str):
        text = value.strip().lower()
        n = int(text) if text.isdigit() else _COUNT_WORDS.get(text)
    else:
        n = None
    if n is None:
        return None, f"number {value!r} is not a whole number"
    if n < 1:
        return None, f"number {value!r} says the area is absent, but the mask has {count} component(s)"
    if n > count:
        return number_word(count), f"number {n} capped at the {count} connected component(s) of the mask"
    return number_word(n), None


def _normalize_location(text: str) -> str | None:
    """``"upper-left corner"`` -> ``"top left"``; None when the words do not name one of the 9 cells."""
    row = col = None
    words = [token for token in re.split(r"[\s\-]+", text) if token and token not in _LOCATION_FILLER]
    if not words:
        return None
    for token in words:
        word = _LOCATION_WORDS.get(token)
        if word is None:
            return None
        if word in ("top", "bottom"):
            if row not in (None, word):
                return None
            row = word
        elif word in ("left", "right"):
            if col not in (None, word):
                return None
            col = word
    return " ".join(w for w in (row, col) if w) or "center"


def build_prompt(record: dict, keyword: str, attributes: tuple[str, ...] = ATTRIBUTES) -> str:
    """The real-text prompt of one class: :data:`TEMPLATE` with the left-out attributes dropped."""
    keyword_words = [keyword] if "keyword" in attributes else []
    if record["count"] == 0:
        return " ".join(["no", *keyword_words, "area in the image."])
    words = [record[f] for f in ("number", "shape", "size", "color") if f in attributes]
    text = " ".join([*words, *keyword_words, "area"])
    if "location" in attributes:
        text += f", located in the {record['location']} of the image"
    return text + "."
