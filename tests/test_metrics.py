"""Tests for metalm.evaluation.metrics (hand-computed expectations)."""

from __future__ import annotations

import shutil

import pytest

from metalm.evaluation import metrics
from metalm.evaluation.metrics import (
    accuracy,
    caption_scores,
    exact_match,
    macro_f1,
    normalize_vqa_answer,
    rouge_l,
    squad_f1,
    vqa_accuracy,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java not on PATH")


# --------------------------------------------------------------------------------------------- VQA
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),  # period stripped (not before a digit), "two" -> "2"
        ("2 dogs", "2 dogs"),
        ("a red circle", "red circle"),  # article removed
        ("The  Red\tCircle\n", "red circle"),
        ("yes!", "yes"),  # "!" not adjacent to a space -> replaced by " ", then split
        ("yes !", "yes"),  # " !" present -> removed
        ("isnt", "isn't"),  # contractions table maps apostrophe-less -> apostrophe form
        ("isn't", "isn't"),  # apostrophe is not in the punct list
        ("none", "0"),
        ("3.5", "3.5"),  # period before a digit is kept
        ("1,000", "1000"),  # digit,digit triggers commaStrip -> punctuation removed without a space
        ("red,blue", "red blue"),  # no digit comma and no ", " -> replaced by a space
        ("red, blue", "red blue"),
        ("left/right", "left right"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_normalize_vqa_two_dogs_equivalence() -> None:
    assert normalize_vqa_answer("Two dogs.") == normalize_vqa_answer("2 dogs")


def test_vqa_accuracy_leave_one_out_two_matches() -> None:
    # 10 answers, 2 equal the prediction. Leave-one-out subsets (9 answers each):
    #   drop one of the 2 matching answers (2 subsets): 1 match  -> min(1/3, 1) = 1/3
    #   drop one of the 8 others          (8 subsets): 2 matches -> min(2/3, 1) = 2/3
    #   mean = (2 * 1/3 + 8 * 2/3) / 10 = (18/3) / 10 = 0.6
    answers = ["2", "two"] + ["3"] * 8  # "two" normalizes to "2"
    assert vqa_accuracy("2", answers) == pytest.approx(0.6)
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.6)


@pytest.mark.parametrize(("n_match", "expected"), [(0, 0.0), (1, 0.3), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_counts(n_match: int, expected: float) -> None:
    # 3 matches: drop a match (3 subsets) -> 2/3; drop another (7) -> 1  => (2 + 7) / 10 = 0.9
    answers = ["cat"] * n_match + ["dog"] * (10 - n_match)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_single_answer_is_normalized_exact_match() -> None:
    assert vqa_accuracy("Yes!", ["yes"]) == 1.0
    assert vqa_accuracy("a circle", ["circle"]) == 1.0
    assert vqa_accuracy("square", ["circle"]) == 0.0
    assert vqa_accuracy("blue", ["red", "blue"]) == 1.0  # fewer than 10 answers: match any
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_vqa_accuracy_strict_official_conditional_normalization() -> None:
    # Unanimous answers: the official script does not normalize, so "two" != "2".
    assert vqa_accuracy("two", ["2"] * 10, strict_official=True) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    # Disagreeing answers: both sides normalized.
    assert vqa_accuracy("two", ["2"] * 9 + ["3"], strict_official=True) == 1.0


# ------------------------------------------------------------------------------------ classification
def test_accuracy() -> None:
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])


def test_macro_f1_hand_computed() -> None:
    golds = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "c", "c"]
    # a: TP=2 FP=0 FN=1 -> P=1,   R=2/3 -> F1 = 2*(2/3)/(5/3) = 0.8
    # b: TP=1 FP=1 FN=1 -> P=1/2, R=1/2 -> F1 = 0.5
    # c: TP=1 FP=1 FN=0 -> P=1/2, R=1   -> F1 = 2*(1/2)/(3/2) = 2/3
    # macro = (0.8 + 0.5 + 2/3) / 3
    assert macro_f1(preds, golds) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_macro_f1_unpredicted_and_extra_labels() -> None:
    # "d" is never predicted -> F1 0; a: P=1/2, R=1 -> 2/3. macro = (2/3 + 0) / 2
    assert macro_f1(["a", "a"], ["a", "d"]) == pytest.approx(1 / 3)
    # explicit label "z" absent from both -> precision + recall == 0 -> F1 0
    assert macro_f1(["a"], ["a"], labels=["a", "z"]) == pytest.approx(0.5)


# --------------------------------------------------------------------------------- text overlap / QA
def test_rouge_l_hand_computed() -> None:
    # LCS("the cat sat", "the cat sat on the mat") = 3 -> P = 3/3 = 1, R = 3/6 = 0.5
    # F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * 0.5 / (0.5 + 1.44) = 1.22 / 1.94
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(1.22 / 1.94)
    assert rouge_l("a b c", "a b c") == pytest.approx(1.0)
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "a b") == 0.0
    # multiple references: P and R maximized separately -> identical reference gives 1
    assert rouge_l("a b", ["c d", "a b"]) == pytest.approx(1.0)


def test_squad_f1_and_exact_match() -> None:
    # normalized: "cat sat" vs "cat sat on mat" -> common 2, P = 1, R = 0.5, F1 = 2/3
    assert squad_f1("The cat sat!", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert squad_f1("dog", "cat") == 0.0
    assert squad_f1("", "") == 1.0
    assert squad_f1("cat", ["dog", "a cat"]) == 1.0
    assert exact_match("The Cat.", "cat") == 1.0
    assert exact_match("cats", ["cat", "dog"]) == 0.0


# ------------------------------------------------------------------------------------------ captions
CAPTION_PREDS = {
    1: "A man is riding a brown horse.",
    2: "Two dogs are playing in the snow.",
    "img3": "A plate of food on a wooden table.",
}
CAPTION_REFS = {
    1: ["A man rides a horse on the beach.", "A person riding a brown horse."],
    2: ["Two dogs are playing in the snow.", "Dogs play in snow, outside."],
    "img3": ["A plate with food sits on a table.", "Food on a white plate."],
}


@pytest.fixture(scope="module")
def ptb_scores() -> dict:
    return caption_scores(CAPTION_PREDS, CAPTION_REFS)


@needs_java
def test_caption_scores_cider_matches_pycocoevalcap(ptb_scores: dict) -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The standard coco-caption pipeline: PTBTokenizer on gts and res separately, then the scorers.
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in CAPTION_REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in CAPTION_PREDS.items()})
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)

    assert ptb_scores["tokenizer"] == "ptb"
    assert ptb_scores["num_images"] == 3
    assert ptb_scores["CIDEr"] == pytest.approx(float(cider))
    assert ptb_scores["BLEU-4"] == pytest.approx(bleu[3])
    assert ptb_scores["CIDEr"] > 0
    assert set(ptb_scores) >= {"CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"}


@needs_java
def test_ptb_tmpdir_path_matches_library(monkeypatch: pytest.MonkeyPatch) -> None:
    # Punctuation, case, contractions, and a line separator inside a caption (would misalign lines).
    caps = {"a": ["A man, riding a horse.", "It isn't 3.5 dogs' bone?"], "b": ["two\u2028lines\r here", ""]}
    lib = metrics._ptb_tokenize(caps)
    monkeypatch.setattr(metrics, "_dir_writable", lambda _path: False)
    assert metrics._ptb_tokenize(caps) == lib
    assert lib == {"a": ["a man riding a horse", "it is n't 3.5 dogs bone"], "b": ["two lines here", ""]}


def test_bleu4_identical_caption_is_one() -> None:
    preds = {1: "a man is riding a brown horse", 2: "two dogs are playing in the snow"}
    refs = {k: [v] for k, v in preds.items()}
    scores = caption_scores(preds, refs, tokenizer="simple")  # no JVM needed for lower-case words
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)


def test_caption_scores_fallback_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *_args, **_kw: None)
    with pytest.warns(RuntimeWarning, match="Java"):
        scores = caption_scores(CAPTION_PREDS, CAPTION_REFS)
    assert scores["tokenizer"] == (
        "fallback-simple (java missing; numbers not comparable to published PTB-tokenized scores)"
    )
    assert scores["CIDEr"] > 0
    assert 0 < scores["BLEU-1"] <= 1


def test_caption_scores_validates_ids() -> None:
    with pytest.raises(ValueError):
        caption_scores({1: "a"}, {2: ["a"]}, tokenizer="simple")
    with pytest.raises(ValueError):
        caption_scores({1: "a"}, {1: []}, tokenizer="simple")
    with pytest.raises(ValueError):
        caption_scores({1: "a"}, {1: ["a"]}, tokenizer="bpe")
