"""Exact concept attributes computed from the mask and the image: the default backend.

Milliseconds per 352×352 slice, no model, no network, the same answer every time. The rules, in the
words Slicer shows to users:

number
    Connected components of the class (8-connected in 2D, 26-connected in 3D). A component smaller
    than :data:`SPECK_FRACTION` (5 %) of the class's largest component is annotation noise (a
    speck) and is not counted. Words: ``one`` … ``five``, ``multiple`` for six or more.
size
    Share of the image area (2D) or volume (3D) that the whole class covers: ``tiny`` below 1 %,
    ``small`` below 5 %, ``medium`` below 20 %, ``large`` from 20 % (:data:`SIZE_LIMITS`).
shape
    Of the largest component, in physical units (pixel spacing), checked in this order:

    1. ``ring-shaped`` when the holes it encloses add at least :data:`RING_HOLE_FRACTION` (20 %)
       to its area (e.g. a myocardium in a short-axis slice).
    2. ``irregular`` when its *ellipse fit* is below :data:`IRREGULAR_FIT` (0.80). The ellipse
       fit is the overlap (intersection over union) of the region with the ellipse (ellipsoid in 3D)
       that has the same centre and second moments. Ellipses score about 1.0, a square 0.83, a
       5-lobed star 0.57, a crescent 0.41. Components under :data:`MIN_OUTLINE_PIXELS` (50) pixels
       or voxels have too few to judge an outline and are never called irregular.
    3. by the axis ratio ``sqrt(λ_max / λ_min)`` of the second-moment eigenvalues (longest over
       shortest principal axis): ``round`` below :data:`ROUND_MAX_RATIO` (1.25), ``oval`` below
       :data:`OVAL_MAX_RATIO` (2.0), ``elongated`` from 2.0. A 3:1 ellipse is elongated, 3:2 oval.
       In 3D a flat, disc-like region also has a high ratio and reads ``elongated``.
color
    RGB images: the per-channel median colour of the class, named by hue, saturation and value
    (HSV, see :func:`name_rgb`). Grayscale images and volumes: the class's median intensity against
    the median of a ring around it (a tenth of the class's equivalent diameter wide, 2 to 5 pixels;
    ring pixels at or below the image's 1st percentile — air, padding — are left out unless nothing
    else surrounds the class), as a share of the image's 1st–99th percentile range: ``dark`` below
    −:data:`CONTRAST_LIMIT` (−5 %), ``bright`` above +5 %, else ``gray``.
location
    The class's centroid. 2D: the cell of a 3×3 grid over the image (``top left`` … ``center`` …
    ``bottom right``; the middle row and column add no word). 3D: the centroid's offset from the
    centre of the volume's bounding box in patient coordinates (index → LPS through spacing and
    direction), as a share of the box's half-extent; each patient axis whose offset is beyond
    :data:`CENTER_BAND_3D` (0.2; a hemisphere's centroid lies about 0.3 off the midline of a head
    volume, a whole brain's within 0.2 of its centre) adds its word in the order left/right,
    anterior/posterior, superior/inferior (``left anterior``); ``center`` when none does.
"""
from __future__ import annotations

import colorsys

import numpy as np
from scipy import ndimage as ndi

from .scene import Scene
from .vocabulary import FIELDS, location_3d, number_word

SPECK_FRACTION = 0.05
SIZE_LIMITS = ((0.01, "tiny"), (0.05, "small"), (0.20, "medium"))
RING_HOLE_FRACTION = 0.20
IRREGULAR_FIT = 0.80
MIN_OUTLINE_PIXELS = 50
ROUND_MAX_RATIO = 1.25
OVAL_MAX_RATIO = 2.0
CONTRAST_LIMIT = 0.05
RING_SHARE = 0.1
RING_WIDTH = (2, 5)
GRID_BAND_2D = 1 / 3
CENTER_BAND_3D = 0.2

_EXACT_ELLIPSE_PIXELS = 200_000
_ROWS_2D = ("top", None, "bottom")
_COLS_2D = ("left", None, "right")


class GeometricBackend:
    """The default backend: its answer is the geometric record itself."""

    name = "geometric"
    id = "geometric"

    def refine(self, scene: Scene, record: dict, keyword: str, fields: tuple[str, ...]) -> dict:
        return record


def measure_classes(scene: Scene, labels: list[int]) -> list[dict]:
    """Geometric attributes of the classes with the given label values (1-based)."""
    boxes = ndi.find_objects(scene.classes, max_label=max(labels))
    return [_measure(scene, label, boxes[label - 1]) for label in labels]


def _measure(scene: Scene, label: int, box) -> dict:
    if box is None:
        return {"count": 0, "number": number_word(0), **{f: None for f in FIELDS[1:]}, "measures": {"fraction": 0.0}}
    inside = scene.classes[box] == label
    structure = ndi.generate_binary_structure(scene.ndim, scene.ndim)
    components, _ = ndi.label(inside, structure)
    sizes = np.bincount(components.ravel())[1:]
    count = int((sizes >= SPECK_FRACTION * sizes.max()).sum())
    total = int(sizes.sum())
    fraction = total / scene.size
    ratio, fit, holes = shape_measures(components == np.argmax(sizes) + 1, scene.spacing)
    centroid = np.array(ndi.center_of_mass(inside)) + [s.start for s in box]
    location, offset = _location(scene, centroid)
    measures = {
        "fraction": fraction, "components": int(sizes.size), "axis_ratio": ratio, "ellipse_fit": fit,
        "hole_fraction": holes, "centroid": centroid.tolist(), "offset": offset.tolist(),
    }
    if scene.grayscale:
        measures["contrast"] = _contrast(scene, label, box, total)
        color = name_contrast(measures["contrast"])
    else:
        measures["rgb"] = np.median(scene.rgb[box][inside], axis=0).tolist()
        color = name_rgb(*measures["rgb"])
    return {
        "count": count,
        "number": number_word(count),
        "shape": name_shape(ratio, fit, holes, int(sizes.max())),
        "size": next((word for limit, word in SIZE_LIMITS if fraction < limit), "large"),
        "color": color,
        "location": location,
        "measures": _rounded(measures),
    }


def shape_measures(component: np.ndarray, spacing: np.ndarray) -> tuple[float, float, float]:
    """Axis ratio, ellipse fit and hole fraction of one component (see the module docstring)."""
    ndim = component.ndim
    points = np.argwhere(component) * spacing
    mean = points.mean(axis=0)
    # A pixel is a box, not a point: adding its own second moment (s²/12) keeps a 1-pixel disc round.
    cov = np.atleast_2d(np.cov(points, rowvar=False, bias=True)) + np.diag(spacing**2 / 12)
    eigenvalues = np.linalg.eigvalsh(cov)
    ratio = float(np.sqrt(eigenvalues[-1] / eigenvalues[0]))
    inverse = np.linalg.inv(cov)
    limit = ndim + 2  # a uniform ellipsoid has variance a²/(d+2) along a semi-axis of length a
    delta = points - mean
    hits = int((np.einsum("ij,jk,ik->i", delta, inverse, delta) <= limit).sum())
    # The ellipse's size in pixels: exact (grid points inside it) while small, where discreteness
    # matters; from its volume (unit-ball volume × semi-axes) when larger, to bound time and memory.
    ellipse = (np.pi if ndim == 2 else 4 * np.pi / 3) * np.sqrt(np.linalg.det(limit * cov)) / np.prod(spacing)
    if ellipse <= _EXACT_ELLIPSE_PIXELS:
        half = np.sqrt(limit * np.diag(cov)) / spacing
        centre = mean / spacing
        axes = np.ogrid[tuple(slice(int(np.floor(c - h)), int(np.ceil(c + h)) + 1) for c, h in zip(centre, half))]
        offsets = [(axis * s - m) for axis, s, m in zip(axes, spacing, mean)]
        form = sum(inverse[i, j] * offsets[i] * offsets[j] for i in range(ndim) for j in range(ndim))
        ellipse = int((form <= limit).sum())
    fit = hits / (len(points) + ellipse - hits)
    holes = float(ndi.binary_fill_holes(component).sum() - len(points)) / len(points)
    return ratio, fit, holes


def name_shape(ratio: float, fit: float, holes: float, pixels: int) -> str:
    if holes >= RING_HOLE_FRACTION:
        return "ring-shaped"
    if fit < IRREGULAR_FIT and pixels >= MIN_OUTLINE_PIXELS:
        return "irregular"
    return "round" if ratio < ROUND_MAX_RATIO else "oval" if ratio < OVAL_MAX_RATIO else "elongated"


def name_rgb(red: float, green: float, blue: float) -> str:
    """Name an RGB colour (0..1) by hue (degrees), saturation and value.

    ``black`` when value < 0.2; ``white`` (value ≥ 0.8) or ``gray`` when saturation < 0.2; otherwise
    by hue: red below 15° and from 345°, orange to 45°, yellow to 70°, green to 165°, blue to 255°,
    purple to 290°, pink to 345°. Orange with value < 0.6 is ``brown``; red with saturation < 0.5 and
    value ≥ 0.7 is ``pink``.
    """
    hue, saturation, value = colorsys.rgb_to_hsv(red, green, blue)
    hue *= 360
    if value < 0.2:
        return "black"
    if saturation < 0.2:
        return "white" if value >= 0.8 else "gray"
    if hue < 15 or hue >= 345:
        return "pink" if saturation < 0.5 and value >= 0.7 else "red"
    if hue < 45:
        return "brown" if value < 0.6 else "orange"
    for limit, word in ((70, "yellow"), (165, "green"), (255, "blue"), (290, "purple")):
        if hue < limit:
            return word
    return "pink"


def name_contrast(contrast: float) -> str:
    if contrast < -CONTRAST_LIMIT:
        return "dark"
    return "bright" if contrast > CONTRAST_LIMIT else "gray"


def _contrast(scene: Scene, label: int, box, total: int) -> float:
    """(median inside − median of the surrounding ring) / the image's 1–99 percentile range."""
    diameter = 2 * (total / np.pi) ** 0.5 if scene.ndim == 2 else 2 * (3 * total / (4 * np.pi)) ** (1 / 3)
    width = int(np.clip(round(RING_SHARE * diameter), *RING_WIDTH))
    grown = tuple(slice(max(s.start - width, 0), min(s.stop + width, n)) for s, n in zip(box, scene.classes.shape))
    inside = scene.classes[grown] == label
    structure = ndi.generate_binary_structure(scene.ndim, scene.ndim)
    ring = ndi.binary_dilation(inside, structure, iterations=width) & ~inside
    values = scene.gray[grown]
    low, high = scene.intensity_range
    around = values[ring]
    if around.size == 0:  # the class fills the whole image: nothing to compare with
        return 0.0
    body = around[around > low]  # leave out air and padding outside the body, when anything else is left
    around = body if body.size else around
    return float(np.median(values[inside]) - np.median(around)) / ((high - low) or 1.0)


def _location(scene: Scene, centroid: np.ndarray) -> tuple[str, np.ndarray]:
    """Location words and the offset from the centre in −1..1 (2D: row, column; 3D: L, P, S)."""
    shape = np.array(scene.classes.shape, dtype=float)
    delta = centroid - (shape - 1) / 2
    if scene.ndim == 2:
        offset = delta / (shape / 2)
        row, col = (int(np.digitize(u, (-GRID_BAND_2D, GRID_BAND_2D))) for u in offset)
        words = [w for w in (_ROWS_2D[row], _COLS_2D[col]) if w]
        return " ".join(words) or "center", offset
    # Array axes are (z, y, x); spacing is kept in array order, the direction maps (x, y, z) to LPS.
    physical = scene.direction @ (delta * scene.spacing)[::-1]
    half = np.abs(scene.direction) @ (shape * scene.spacing / 2)[::-1]
    offset = np.divide(physical, half, out=np.zeros(3), where=half > 0)
    sides = tuple(int(np.sign(u)) if abs(u) > CENTER_BAND_3D else 0 for u in offset)
    return location_3d(sides), offset


def _rounded(measures: dict) -> dict:
    """Measures rounded for JSON caches and tables (4 decimals)."""
    return {k: [round(float(x), 4) for x in v] if isinstance(v, list) else round(v, 4) for k, v in measures.items()}
