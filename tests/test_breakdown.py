"""Per-question-type VQA accuracy and per-attribute caption correctness on hand-made predictions."""

from __future__ import annotations

import pytest

from metalm.evaluation.breakdown import (
    attribute_correctness,
    caption_attributes,
    caption_by_attribute,
    question_type,
    question_wording,
    vqa_against_wording_prior,
    vqa_by_question_type,
    wording_prior,
    wording_prior_by_question_type,
)


def test_question_type_from_answers():
    assert question_type(["red"]) == "colour"
    assert question_type(["Teal"]) == "colour"
    assert question_type(["triangle"]) == "shape"
    assert question_type(["yes"]) == "yes/no"
    assert question_type(["no"]) == "yes/no"
    with pytest.raises(ValueError):
        question_type(["maybe"])


def test_vqa_by_question_type():
    records = [
        {"gold": ["red"], "prediction": "red", "score": 1.0},
        {"gold": ["blue"], "prediction": "red", "score": 0.0},
        {"gold": ["circle"], "prediction": "circle", "score": 1.0},
        {"gold": ["yes"], "prediction": "no", "score": 0.0},
        {"gold": "no", "prediction": "no", "score": 1.0},
    ]
    out = vqa_by_question_type(records)
    assert out == {
        "colour": {"accuracy": 50.0, "n": 2},
        "shape": {"accuracy": 100.0, "n": 1},
        "yes/no": {"accuracy": 50.0, "n": 2},
    }


def test_wording_prior_answers_from_the_question_alone():
    assert question_wording("Is there not a RED shape?") == "is there not a <colour> shape ?"
    assert question_wording("what color is the triangle?") == "what color is the <shape> ?"
    train = [
        ("is there a red shape?", "no"),
        ("is there a blue shape?", "no"),
        ("is there a teal shape?", "yes"),  # the minority answer of its wording
        ("is there not a red shape?", "yes"),
        ("what color is the circle?", "red"),
    ]
    prior = wording_prior(train)
    assert prior == {
        "is there a <colour> shape ?": "no",
        "is there not a <colour> shape ?": "yes",
        "what color is the <shape> ?": "red",
    }
    test = [
        ("is there a gray shape?", ["no"]),  # prior right
        ("is there a green shape?", ["yes"]),  # prior wrong: only the image tells
        ("is there not a black shape?", ["yes"]),
        ("what color is the rectangle?", ["blue"]),
        ("what shape is this?", ["circle"]),  # a wording never seen in training scores 0
    ]
    assert wording_prior_by_question_type(test, prior) == {
        "colour": {"accuracy": 0.0, "n": 1},
        "shape": {"accuracy": 0.0, "n": 1},
        "yes/no": {"accuracy": 200 / 3, "n": 3},
    }


def test_vqa_against_wording_prior_keeps_only_what_the_image_answers():
    prior = {"is there a <colour> shape ?": "no", "is there not a <colour> shape ?": "yes"}
    questions = {
        "a": "is there a red shape?",  # gold no = prior: left out
        "b": "is there a blue shape?",  # gold yes: only the image tells
        "c": "is there not a teal shape?",  # gold no: only the image tells
        "d": "what color is the circle?",  # no prior for this wording: kept
    }
    records = [
        {"id": "a", "gold": ["no"], "score": 1.0},
        {"id": "b", "gold": ["yes"], "score": 1.0},
        {"id": "c", "gold": ["no"], "score": 0.0},
        {"id": "d", "gold": ["red"], "score": 1.0},
        {"id": "e", "gold": ["yes"], "score": 1.0},  # question unknown: left out
    ]
    assert vqa_against_wording_prior(records, questions, prior) == {
        "colour": {"accuracy": 100.0, "n": 1},
        "yes/no": {"accuracy": 50.0, "n": 2},
        "yes/no: colour": {"accuracy": 50.0, "n": 2},
    }


def test_caption_attributes_first_named_value_counts():
    assert caption_attributes("a teal circle.") == {"colour": "teal", "shape": "circle"}
    assert caption_attributes("##l triangle.") == {"colour": None, "shape": "triangle"}
    # "bluel" is not a colour word; a later correct colour does not undo the first claim.
    assert caption_attributes("a bluel triangle.") == {"colour": None, "shape": "triangle"}
    assert caption_attributes("a red, no, blue circle") == {"colour": "red", "shape": "circle"}


def test_attribute_correctness_and_aggregate():
    assert attribute_correctness("a red circle.", "a red circle.") == {"colour": True, "shape": True}
    assert attribute_correctness("a blue circle.", "a red circle.") == {"colour": False, "shape": True}
    assert attribute_correctness("triangle.", "a gray triangle.") == {"colour": False, "shape": True}
    records = [
        {"prediction": "a red circle.", "gold": "a red circle."},
        {"prediction": "a blue circle.", "gold": ["a red circle."]},
        {"prediction": "a gray rectangle.", "gold": "a gray triangle."},
        {"prediction": "", "gold": "a green triangle."},
    ]
    assert caption_by_attribute(records) == {
        "colour": {"accuracy": 50.0, "n": 4},
        "shape": {"accuracy": 50.0, "n": 4},
    }


def test_continuation_pieces_of_a_wordpiece_vocabulary():
    from metalm.data.processor import continuation_pieces
    from metalm.recipe import load_tokenizer

    tok = load_tokenizer("packaged:minilm-l6")
    pieces = set(continuation_pieces(tok))
    assert tok.convert_tokens_to_ids("##l") in pieces
    assert tok.convert_tokens_to_ids("teal") not in pieces and tok.convert_tokens_to_ids("tea") not in pieces


def _write(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_paired_change_by_group_compares_the_same_questions(tmp_path):
    from metalm.evaluation.breakdown import paired_change_by_group

    groups = ["colour"] * 4 + ["yes/no"] * 2
    k0 = [1, 1, 0, 1, 1, 0]
    k4 = {0: [1, 0, 0, 1, 1, 1], 1: [1, 1, 0, 1, 1, 1]}  # colour question 2: right in one seed of two
    _write(tmp_path / "predictions-t-k0-s0.jsonl", [{"group": g, "score": s} for g, s in zip(groups, k0)])
    for seed, scores in k4.items():
        _write(tmp_path / f"predictions-t-k4-s{seed}.jsonl", [{"group": g, "score": s} for g, s in zip(groups, scores)])  # fmt: skip
    table = paired_change_by_group(tmp_path, "t", 0, 4)
    colour, yes_no = table["colour"], table["yes/no"]
    assert (colour["n"], colour["from"], colour["to"]) == (4, 75.0, 62.5)
    assert colour["mean"] == pytest.approx(-12.5)  # one question of four lost half its answers
    assert colour["ci95"] == pytest.approx(1.96 * 25.0 / 2)  # diffs 0,-50,0,0: std 25 over sqrt(4)
    assert (yes_no["mean"], yes_no["ci95"]) == (50.0, pytest.approx(1.96 * 70.7107 / 2**0.5, rel=1e-4))
    _write(tmp_path / "predictions-t-k1-s0.jsonl", [{"group": "shape", "score": 1}] * 6)
    with pytest.raises(ValueError, match="not asked the same questions"):
        paired_change_by_group(tmp_path, "t", 0, 1)
    with pytest.raises(FileNotFoundError):
        paired_change_by_group(tmp_path, "t", 0, 2)


def test_answer_flips_names_what_lost_answers_become(tmp_path):
    from metalm.evaluation.breakdown import answer_flips, flips_sentence

    def rows(predictions, shown=()):
        golds = ["brown", "gray", "red", "yes"]
        return [
            {
                "id": str(i),
                "group": "yes/no" if g == "yes" else "colour",
                "gold": g,
                "prediction": p,
                "score": float(p == g),
                "demonstration_answers": list(shown),
            }  # fmt: skip
            for i, (g, p) in enumerate(zip(golds, predictions))
        ]

    _write(tmp_path / "predictions-t-k0-s0.jsonl", rows(["brown", "gray", "blue", "no"]))
    # Seed 0 showed a "Red" answer (case-folded, it is what brown became); seed 1 showed none it became.
    _write(tmp_path / "predictions-t-k4-s0.jsonl", rows(["red", "gray", "red", "yes"], ["Red", "no"]))
    _write(tmp_path / "predictions-t-k4-s1.jsonl", rows(["red", "teal", "blue", "no"], ["green", "yes"]))
    flips = answer_flips(tmp_path, "t", 0, 4, "colour")
    assert (flips["copied"], flips["gold_shown"]) == (1, 0)
    _write(tmp_path / "predictions-t-k4-s1.jsonl", rows(["red", "teal", "blue", "no"], ["Gray ", "yes"]))
    flips = answer_flips(tmp_path, "t", 0, 4, "colour")
    assert flips == {
        "lost": 3,
        "gained": 1,
        "seeds": 2,
        "questions": 3,
        "confusions": [("brown", "red", 2), ("gray", "teal", 1)],
        "copied": 1,
        "gold_shown": 1,  # seed 1's gray question was shown a "Gray " answer and said teal
    }
    with pytest.raises(FileNotFoundError):
        answer_flips(tmp_path, "t", 1, 4, "colour")
    # With the questions: how many lost answers were to a negated question, against the group's share.
    questions = {
        "0": "is there not a brown shape?",
        "1": "what color is it?",
        "2": "is no red shape present?",
    }
    flips = answer_flips(tmp_path, "t", 0, 4, "colour", questions)
    assert (flips["negated"], flips["negated_questions"]) == (2, 2)  # brown lost twice; red was never right
    assert flips_sentence(flips).endswith(
        "(1 of the 3 the answer of a demonstration shown before the question; the right answer was shown "
        "before 1); 2 of the 3 ask with a negation, as 2 of the 3 questions do"
    )


def test_what_the_image_answers_reads_negation():
    from metalm.evaluation.breakdown import what_the_image_answers

    assert what_the_image_answers("is there a red shape?", ["yes"]) == "colour, in the image"
    assert what_the_image_answers("is there a red shape?", ["no"]) == "colour, not in the image"
    assert what_the_image_answers("is there not a red shape?", ["no"]) == "colour, in the image"
    assert what_the_image_answers("is no circle present?", ["yes"]) == "shape, not in the image"
    assert what_the_image_answers("does the image not contain a triangle?", ["no"]) == "shape, in the image"
    assert what_the_image_answers("what color is the circle?", ["red"]) is None  # not yes/no
    assert what_the_image_answers("is it big?", ["yes"]) is None  # asks about no colour or shape


def test_yes_no_by_image_shows_a_model_that_says_no(tmp_path):
    """A model answering "no" to every plain question scores 75 % on yes/no and 0 on the one question about a
    colour the image has; the paired change by the same groups takes the records' questions by id."""
    from metalm.evaluation.breakdown import image_answer_group, paired_change_by_group, yes_no_by_image

    questions = {"a": "is there a red shape?", "b": "is there a blue shape?", "c": "is there a green shape?",
                 "d": "is there a circle?", "e": "what color is it?"}  # fmt: skip
    gold = {"a": "yes", "b": "no", "c": "no", "d": "no", "e": "red"}
    says_no = [{"id": i, "gold": [gold[i]], "score": float(gold[i] in ("no", "red"))} for i in questions]
    table = yes_no_by_image(says_no, questions)
    assert table == {
        "colour, in the image": {"accuracy": 0.0, "n": 1},
        "colour, not in the image": {"accuracy": 100.0, "n": 2},
        "shape, not in the image": {"accuracy": 100.0, "n": 1},
    }
    looks = [{**r, "score": 1.0} for r in says_no]
    _write(tmp_path / "predictions-t-k0-s0.jsonl", looks)
    _write(tmp_path / "predictions-t-k4-s0.jsonl", says_no)
    change = paired_change_by_group(tmp_path, "t", 0, 4, image_answer_group(questions))
    assert set(change) == set(table)  # the colour question "e" belongs to no group
    assert change["colour, in the image"]["mean"] == -100.0
    assert change["colour, not in the image"]["mean"] == 0.0
