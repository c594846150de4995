"""Built-in data for in-context training: ``easy_vqa_documents`` (interleaved documents) and
``easy_vqa_attributes`` (the attribute questions fast binding asks).

``easy_vqa_documents``: interleaved documents of several easy-VQA images and texts (built-in data).

Flamingo, OBELICS and MM1 found few-shot ability comes with *interleaved* data: documents holding many
images and texts, where text refers back across images. A document here is 3-5 images of one split, each
followed by its caption and, when it shares its shape or colour with an earlier image of the document, a
clause saying which (``"a red circle, the same shape as the first."``): that text can only be written by
comparing the image with the ones before it. Documents are drawn with a fixed seed per split, every image
of the split in exactly one document (the last may hold fewer than 3).
"""

from __future__ import annotations

import random
import re

from metalm.data.records import ImagePart, ImageText, Interleaved, TextPart, VQAExample

__all__ = ["ATTRIBUTE_QUESTIONS", "easy_vqa_attributes", "easy_vqa_documents"]

# easy-VQA's own phrasings of the two attribute questions (the package's question templates).
ATTRIBUTE_QUESTIONS = {
    "shape": ("what shape is in the image?", "what shape does the image contain?", "what shape is present?"),
    "color": (
        "what color is the shape?",
        "what is the color of the shape?",
        "what color is the {shape}?",
        "what is the color of the {shape}?",
    ),
}

ORDINALS = ("first", "second", "third", "fourth", "fifth")
_CAPTION = re.compile(r"^a (\w+) (\w+)\.$")


def _document_text(captions: list[tuple[str, str]], j: int) -> str:
    """The text after image `j`: its caption, and the earliest earlier image sharing its shape or colour."""
    color, shape = captions[j]
    for attribute, value in (("shape", shape), ("colour", color)):
        same = [i for i in range(j) if captions[i][0 if attribute == "colour" else 1] == value]
        if same:
            return f"a {color} {shape}, the same {attribute} as the {ORDINALS[same[0]]}."
    return f"a {color} {shape}."


def easy_vqa_documents(images: list[ImageText], split: str) -> list[Interleaved]:
    """Interleaved documents over `images` (the split's captioned images, caption ``a {color} {shape}.``)."""
    labelled = [(rec, _CAPTION.match(rec.text)) for rec in images]
    labelled = [(rec, (m.group(1), m.group(2))) for rec, m in labelled if m is not None]
    rng = random.Random(f"easy_vqa_documents/{split}")
    rng.shuffle(labelled)
    documents: list[Interleaved] = []
    start = 0
    while start < len(labelled):
        chunk = labelled[start : start + rng.randint(3, 5)]
        start += len(chunk)
        captions = [c for _, c in chunk]
        parts: list[ImagePart | TextPart] = []
        for j, (rec, _) in enumerate(chunk):
            parts += [ImagePart(rec.image), TextPart(_document_text(captions, j))]
        documents.append(Interleaved(parts=tuple(parts), id=f"easy_vqa_documents/{split}/{len(documents)}"))
    return documents


def easy_vqa_attributes(images: list[ImageText], split: str) -> list[VQAExample]:
    """Two questions per image, its shape and its colour, each in one of easy-VQA's phrasings (drawn with
    a fixed seed): the open questions a fast-binding episode asks, for in-context training."""
    rng = random.Random(f"easy_vqa_attributes/{split}")
    out: list[VQAExample] = []
    for rec in images:
        match = _CAPTION.match(rec.text)
        if match is None:
            continue
        color, shape = match.groups()
        for attribute, answer in (("shape", shape), ("color", color)):
            question = rng.choice(ATTRIBUTE_QUESTIONS[attribute]).format(shape=shape)
            out.append(
                VQAExample(image=rec.image, question=question, answers=(answer,), id=f"{rec.id}/{attribute}")
            )
    return out
