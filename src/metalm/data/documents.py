"""Built-in data derived from the easy-VQA captions: ``easy_vqa_documents`` (interleaved documents),
``easy_vqa_attributes`` (the attribute questions fast binding asks) and ``easy_vqa_yes_no`` (yes/no questions
balanced between what the image holds and what it does not).

``easy_vqa_yes_no``: in easy-VQA's own questions, 88 % of the yes/no questions about a colour ask about a
colour the image does not have (a third of those about a shape), so a model can answer them well from the
wording alone and never learn to say that the red shape it sees is red. Here each image is asked about each
attribute twice, once of its own value and once of another drawn at random, each time in one of easy-VQA's
eight phrasings of the question (four of them negated: "is no red shape present?"): half the questions ask
about what is there, and the wording says nothing about the answer.

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

from metalm.data.easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES
from metalm.data.records import ImagePart, ImageText, Interleaved, TextPart, VQAExample

__all__ = [
    "ATTRIBUTE_QUESTIONS",
    "YES_NO_QUESTIONS",
    "easy_vqa_attributes",
    "easy_vqa_documents",
    "easy_vqa_yes_no",
]

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

# easy-VQA's own phrasings of its yes/no questions (the package's templates), the same for a colour ("a red
# shape") and a shape ("a circle"); the last four are negated.
_YES_NO_PHRASINGS = (
    "is there a {thing}?", "is there a {thing} in the image?", "does the image contain a {thing}?",
    "is a {thing} present?", "is there not a {thing}?", "is there not a {thing} in the image?",
    "does the image not contain a {thing}?", "is no {thing} present?",
)  # fmt: skip
YES_NO_QUESTIONS = {
    attribute: tuple(t.replace("{thing}", thing) for t in _YES_NO_PHRASINGS)
    for attribute, thing in (("color", "{value} shape"), ("shape", "{value}"))
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


def _colour_and_shape(images: list[ImageText]) -> list[tuple[ImageText, str, str]]:
    """(record, colour, shape) of each image captioned ``a {color} {shape}.``, in order."""
    return [(rec, *match.groups()) for rec in images if (match := _CAPTION.match(rec.text))]


def easy_vqa_attributes(images: list[ImageText], split: str) -> list[VQAExample]:
    """Two questions per image, its shape and its colour, each in one of easy-VQA's phrasings (drawn with
    a fixed seed): the open questions a fast-binding episode asks, for in-context training."""
    rng = random.Random(f"easy_vqa_attributes/{split}")
    out: list[VQAExample] = []
    for rec, color, shape in _colour_and_shape(images):
        for attribute, answer in (("shape", shape), ("color", color)):
            question = rng.choice(ATTRIBUTE_QUESTIONS[attribute]).format(shape=shape)
            out.append(
                VQAExample(image=rec.image, question=question, answers=(answer,), id=f"{rec.id}/{attribute}")
            )
    return out


def negated(question: str) -> bool:
    """Whether an easy-VQA yes/no question is asked in the negative ("is there not ...", "is no ...")."""
    return " not " in question or question.startswith("is no ")


def easy_vqa_yes_no(images: list[ImageText], split: str) -> list[VQAExample]:
    """Four yes/no questions per image (module docstring): for the colour and for the shape, one asking about
    the image's own value and one about another value drawn at random, each in a random one of easy-VQA's
    phrasings (drawn with a fixed seed per split); "yes" exactly when what is asked about is there, or a
    negated question asks about what is not."""
    rng = random.Random(f"easy_vqa_yes_no/{split}")
    values = {"color": tuple(EASY_VQA_COLORS), "shape": EASY_VQA_SHAPES}
    out: list[VQAExample] = []
    for rec, color, shape in _colour_and_shape(images):
        for attribute, own in (("color", color), ("shape", shape)):
            other = rng.choice([v for v in values[attribute] if v != own])
            for asked, there in ((own, "present"), (other, "absent")):
                question = rng.choice(YES_NO_QUESTIONS[attribute]).format(value=asked)
                answer = "yes" if (there == "present") != negated(question) else "no"
                out.append(
                    VQAExample(
                        image=rec.image,
                        question=question,
                        answers=(answer,),
                        id=f"{rec.id}/{attribute}-{there}",
                    )
                )
    return out
