"""easy-VQA, read from the installed ``easy-vqa`` package (no downloads): its questions and images, each
image's colour and shape (from the questions, else the pixels), captions and VQA records.

The built-in datasets ``easy_vqa_captions`` and ``easy_vqa_vqa`` (:mod:`metalm.data.builtin`) are these
records; the spoken questions (:mod:`metalm.data.speech`) are read from here, so that module need not
import the catalogue. A record's split follows ``split_bucket('easy_vqa/train/<id>')`` (docs/data.md).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from metalm.data.records import ImageText, VQAExample
from metalm.data.splits import check_split, split_bucket

__all__ = [
    "CAPTION_TEMPLATE",
    "CAPTION_VARIANTS",
    "EASY_VQA_COLORS",
    "EASY_VQA_SHAPES",
    "ImageLabel",
    "easy_vqa_captions",
    "easy_vqa_image_labels",
    "easy_vqa_root",
    "easy_vqa_vqa",
]

# Exact RGB of each shape colour in the easy-vqa images (measured: every image whose colour the
# questions reveal has its shape drawn in exactly this value).
EASY_VQA_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
EASY_VQA_SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")

CAPTION_TEMPLATE = "a {color} {shape}."
"""The caption of every ``easy_vqa_captions`` record (pre-training target)."""

CAPTION_VARIANTS: tuple[str, ...] = (
    CAPTION_TEMPLATE,
    "an image of a {color} {shape}.",
    "a {color} {shape} on a plain background.",
    "there is a {color} {shape} in the image.",
)
"""Alternative phrasings, e.g. for ``easy_vqa_captions(split, template=...)``."""

# Validation: package-train images whose bucket is below this (about 10%).
_EASY_VQA_VAL_BUCKETS = 10
# The shape fit must beat the runner-up by this factor; at 1.3 it agrees with the questions on
# all 4,737 images whose shape the questions determine (measured), below ~1.22 it does not.
_SHAPE_MARGIN = 1.3


class ImageLabel(NamedTuple):
    """Colour and shape of one easy-vqa image and where each came from ("questions",
    "pixels"); ``None`` where neither source settles it."""

    color: str | None
    shape: str | None
    color_from: str | None
    shape_from: str | None


@lru_cache(maxsize=1)
def easy_vqa_root() -> Path:
    """The easy-vqa package's data folder (its questions and images)."""
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("the easy_vqa datasets need the easy-vqa package: pip install easy-vqa") from None
    return Path(easy_vqa.__file__).resolve().parent / "data"


@lru_cache(maxsize=2)
def _easy_vqa_questions(package_split: str) -> tuple[tuple[str, str, int], ...]:
    with open(easy_vqa_root() / package_split / "questions.json", encoding="utf-8") as fh:
        return tuple((str(q), str(a), int(i)) for q, a, i in json.load(fh))


def _easy_vqa_image(package_split: str, image_id: int) -> str:
    return os.path.join(_easy_vqa_images_dir(package_split), f"{image_id}.png")


@lru_cache(maxsize=2)
def _easy_vqa_images_dir(package_split: str) -> str:
    return str(easy_vqa_root() / package_split / "images")


def _labels_from_questions(
    questions: tuple[tuple[str, str, int], ...],
) -> dict[int, tuple[set[str], set[str], set[str], set[str]]]:
    """Per image: (colours known true, shapes known true, colours known false, shapes known false)."""
    facts: dict[int, tuple[set[str], set[str], set[str], set[str]]] = {}
    for question, answer, image_id in questions:
        col, shp, not_col, not_shp = facts.setdefault(image_id, (set(), set(), set(), set()))
        words = re.findall(r"[a-z]+", question.lower())
        colors = [w for w in words if w in EASY_VQA_COLORS]
        shapes = [w for w in words if w in EASY_VQA_SHAPES]
        if answer in EASY_VQA_COLORS:  # "what color is the circle?" -> also names the shape
            col.add(answer)
            shp.update(shapes)
        elif answer in EASY_VQA_SHAPES:  # "what is the blue shape?" -> also names the colour
            shp.add(answer)
            col.update(colors)
        elif answer in ("yes", "no"):
            # Templates: "is there a red shape?", "is there not a circle?", "is no red shape present?",
            # "does the image not contain a triangle?" -- one attribute each, maybe negated.
            negated = "not" in words or "no" in words
            if (answer == "yes") != negated:
                col.update(colors)
                shp.update(shapes)
            elif len(colors) + len(shapes) == 1:
                not_col.update(colors)
                not_shp.update(shapes)
    return facts


def _settle(known: set[str], excluded: set[str], universe: tuple[str, ...] | dict[str, object]) -> str | None:
    if len(known) == 1 and not (known & excluded):
        return next(iter(known))
    if not known:
        left = [v for v in universe if v not in excluded]
        if len(left) == 1:  # every other value was ruled out by a "no"
            return left[0]
    return None


def _render(shape: str, h: int, w: int) -> object:
    """Coverage (0..1) of an ideal ``shape`` filling an h x w box, 4x supersampled like a renderer."""
    import numpy as np
    from PIL import Image, ImageDraw

    s = 4
    canvas = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1 = w * s - 1, h * s - 1
    if shape == "rectangle":
        draw.rectangle([0, 0, x1, y1], fill=255)
    elif shape == "circle":
        draw.ellipse([0, 0, x1, y1], fill=255)
    else:  # easy-vqa triangles point up with a horizontal base
        draw.polygon([(0, y1), (x1, y1), (x1 / 2, 0)], fill=255)
    return np.asarray(canvas.resize((w, h), Image.BOX), dtype=np.float64) / 255.0


def _labels_from_pixels(path: str) -> tuple[str | None, str | None]:
    """(colour, shape) read from the image itself, or None where it is not clear-cut."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    counts = {
        name: int((packed == (r << 16 | g << 8 | b)).sum()) for name, (r, g, b) in EASY_VQA_COLORS.items()
    }
    ranked = sorted(counts, key=counts.__getitem__, reverse=True)
    if counts[ranked[0]] < 4 or counts[ranked[1]] * 4 > counts[ranked[0]]:
        return None, None
    color = ranked[0]
    # Background: the most frequent value (light, random per image, never a palette colour).
    values, freq = np.unique(packed, return_counts=True)
    bg_packed = int(values[np.argmax(freq)])
    bg = np.array([(bg_packed >> 16) & 255, (bg_packed >> 8) & 255, bg_packed & 255], dtype=np.float64)
    fg = np.array(EASY_VQA_COLORS[color], dtype=np.float64)
    # Per-pixel coverage from the anti-aliased blend between background and shape colour.
    d = fg - bg
    cover = np.clip(((rgb - bg) @ d) / (d @ d), 0.0, 1.0)
    ys, xs = np.nonzero(cover > 0.5)
    if len(ys) == 0:
        return color, None
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    crop = cover[y0 : y1 + 1, x0 : x1 + 1]
    outside = cover.sum() - crop.sum()
    errors = {
        s: float(np.abs(_render(s, y1 - y0 + 1, x1 - x0 + 1) - crop).sum() + outside) for s in EASY_VQA_SHAPES
    }
    best, second = sorted(errors.values())[:2]
    shape = min(errors, key=errors.__getitem__)
    return color, shape if second >= _SHAPE_MARGIN * max(best, 1e-6) else None


@lru_cache(maxsize=2)
def easy_vqa_image_labels(package_split: str) -> Mapping[int, ImageLabel]:
    """Colour and shape of every image of the package's ``"train"`` or ``"test"`` split.

    The questions decide first (open questions name the colour or shape; a "yes" confirms the
    named attribute; "no" to all other values leaves the last one). Where they do not, the pixels
    decide: the colour by exact palette match, the shape by the best-fitting ideal shape when it
    wins clearly. Images settled by neither get ``None``.
    """
    if package_split not in ("train", "test"):
        raise ValueError(f"easy-vqa package split must be 'train' or 'test', got {package_split!r}")
    facts = _labels_from_questions(_easy_vqa_questions(package_split))
    labels: dict[int, ImageLabel] = {}
    for image_id in sorted(facts):
        col, shp, not_col, not_shp = facts[image_id]
        color = _settle(col, not_col, EASY_VQA_COLORS)
        shape = _settle(shp, not_shp, EASY_VQA_SHAPES)
        color_from = shape_from = "questions"
        if color is None or shape is None:
            px_color, px_shape = _labels_from_pixels(_easy_vqa_image(package_split, image_id))
            if color is None:
                color, color_from = px_color, "pixels"
            if shape is None:
                shape, shape_from = px_shape, "pixels"
        labels[image_id] = ImageLabel(
            color, shape, color_from if color else None, shape_from if shape else None
        )
    return labels


def _easy_vqa_images(split: str) -> list[tuple[str, int]]:
    """(package split, image id) of the images in our ``split``, in id order."""
    check_split(split)
    if split == "test":
        return [("test", i) for i in sorted({q[2] for q in _easy_vqa_questions("test")})]
    ids = sorted({q[2] for q in _easy_vqa_questions("train")})
    want_val = split == "validation"
    return [
        ("train", i) for i in ids if (split_bucket(f"easy_vqa/train/{i}") < _EASY_VQA_VAL_BUCKETS) == want_val
    ]


def easy_vqa_captions(split: str, *, template: str = CAPTION_TEMPLATE) -> list[ImageText]:
    """One caption per image, ``template.format(color=..., shape=...)``; images whose colour or
    shape cannot be settled (a handful) are left out."""
    out: list[ImageText] = []
    for package_split, image_id in _easy_vqa_images(split):
        label = easy_vqa_image_labels(package_split)[image_id]
        if label.color is None or label.shape is None:
            continue
        out.append(
            ImageText(
                image=_easy_vqa_image(package_split, image_id),
                text=template.format(color=label.color, shape=label.shape),
                id=f"easy_vqa/{package_split}/{image_id}",
            )
        )
    return out


def easy_vqa_vqa(split: str) -> list[VQAExample]:
    """The package's questions about the images of our ``split``, each with its one answer."""
    images = _easy_vqa_images(split)
    package_split = images[0][0] if images else "train"
    wanted = {i for _, i in images}
    out: list[VQAExample] = []
    for k, (question, answer, image_id) in enumerate(_easy_vqa_questions(package_split)):
        if image_id in wanted:
            out.append(
                VQAExample(
                    image=_easy_vqa_image(package_split, image_id),
                    question=question,
                    answers=(answer,),
                    id=f"easy_vqa/{package_split}/{image_id}/q{k}",
                )
            )
    return out
