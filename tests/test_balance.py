"""``balance: answers``: a stream read so that each question's answers are equally likely (its share of the
stream kept), seeded and resumable; validation reads the records as they are."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from PIL import Image
from pydantic import ValidationError

from metalm.data.records import Classification, VQAExample
from metalm.training.config import StreamConfig
from metalm.training.data import DataStream, StreamRecords
from metalm.training.episodes import balanced_weights

# One question whose wording gives its answer away (9 in 10 "no") and one balanced already.
SKEWED = [("is it red?", "yes")] * 10 + [("is it red?", "no")] * 90 + [("what shape?", "circle")] * 50
SKEWED += [("what shape?", "square")] * 50


def vqa_records(image) -> list[VQAExample]:
    return [VQAExample(image=image, question=q, answers=[a]) for q, a in SKEWED]


def stream(records, processor, *, balance: str | None, split: str = "train", seed: int = 0) -> DataStream:
    config = StreamConfig(source="vqa", format="instruction", balance=balance)
    spec = StreamRecords("vqa", 1.0, records, config)
    return DataStream([spec], processor, seq_len=48, batch_size=4, seed=seed, split=split)


def drawn(data: DataStream, rows: int) -> list[tuple[str, str]]:
    """(question, answer) of the next `rows` rows of the plan (walked, not built)."""
    records = data.streams[0].records
    return [
        (records[r.record].question, records[r.record].answers[0])
        for r in (data.plan.next_row() for _ in range(rows))
    ]


def test_weights_make_each_answer_of_a_question_equally_likely(tmp_path):
    recs = vqa_records(str(tmp_path / "x.png"))
    weights = balanced_weights(recs)
    totals = Counter()
    for rec, w in zip(recs, weights):
        totals[rec.question, rec.answers[0]] += w
    assert totals["is it red?", "yes"] == pytest.approx(50) and totals["is it red?", "no"] == pytest.approx(
        50
    )
    assert totals["what shape?", "circle"] == pytest.approx(50)
    assert sum(weights) == pytest.approx(len(recs))  # each question keeps its share
    # Classification: the whole stream is one task, so the labels weigh alike.
    labels = [Classification(text=f"t{i}", label="a" if i < 3 else "b") for i in range(12)]
    by_label = Counter()
    for rec, w in zip(labels, balanced_weights(labels)):
        by_label[rec.label] += w
    assert by_label["a"] == pytest.approx(6) and by_label["b"] == pytest.approx(6)


def test_a_balanced_stream_draws_the_rare_answer_as_often_as_the_common_one(tiny, tmp_path):
    _, processor = tiny
    recs = vqa_records(str(tmp_path / "x.png"))
    plain = Counter(drawn(stream(recs, processor, balance=None), 2000))
    assert (
        plain["is it red?", "yes"] == 100 and plain["is it red?", "no"] == 900
    )  # every record once an epoch
    counts = Counter(drawn(stream(recs, processor, balance="answers"), 2000))
    red = counts["is it red?", "yes"] + counts["is it red?", "no"]
    assert 0.42 < counts["is it red?", "yes"] / red < 0.58
    assert 0.44 < red / 2000 < 0.56  # the question's share is kept
    # Validation reads the records as they are.
    held = Counter(drawn(stream(recs, processor, balance="answers", split="validation"), 2000))
    assert held == plain


def test_a_balanced_stream_is_seeded_and_resumes_exactly(tiny, tmp_path):
    _, processor = tiny
    recs = vqa_records(str(tmp_path / "x.png"))
    first = stream(recs, processor, balance="answers", seed=3)
    assert drawn(first, 300) == drawn(stream(recs, processor, balance="answers", seed=3), 300)
    state = first.plan.state()
    expected = drawn(first, 250)  # across an epoch's end
    again = stream(recs, processor, balance="answers", seed=3)
    again.plan.load(state)
    assert drawn(again, 250) == expected
    unbalanced = stream(recs, processor, balance=None, seed=3)
    with pytest.raises(ValueError, match="balance"):
        unbalanced.plan.load(state)


def red_yes_share_of_demonstrations(processor, recs, balance: str | None) -> float:
    config = StreamConfig(
        source="vqa", format="in_context", in_context={"shots": [4, 4], "same_task": 0.0}, balance=balance
    )
    data = DataStream([StreamRecords("vqa", 1.0, recs, config)], processor, seq_len=128, batch_size=4, seed=0)
    data.next_batch()  # builds the stream's episode sampler
    sampler, rng = data.streams[0]._episodes, random.Random(0)
    demos = [recs[d] for _ in range(500) for d in sampler.draw(0, rng).demonstrations]
    red = Counter(r.answers[0] for r in demos if r.question == "is it red?")
    return red["yes"] / (red["yes"] + red["no"])


def test_a_balanced_in_context_stream_draws_its_demonstrations_balanced(tiny, tmp_path):
    _, processor = tiny
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    recs = vqa_records(str(image))
    assert 0.42 < red_yes_share_of_demonstrations(processor, recs, "answers") < 0.58
    assert red_yes_share_of_demonstrations(processor, recs, None) < 0.16  # 0.1 as the records are


def test_balance_is_refused_where_there_is_no_answer():
    with pytest.raises(ValidationError, match="balances the answers of vqa"):
        StreamConfig(source="bbc_news_text", balance="answers")
    with pytest.raises(ValidationError, match="balance"):
        StreamConfig(source="vqa", balance="everything")
    with pytest.raises(ValidationError, match="a sharded source is read as it streams"):
        StreamConfig(source="data/cc3m/{00000..00003}.tar", kind="image_text", balance="answers")
