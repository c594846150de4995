"""In-context training rows (format: in_context) and the fast-binding evaluation."""

from __future__ import annotations

import random
import string
from types import SimpleNamespace

import pytest
import torch

from metalm.data.made_up import HELD_OUT_WORDS, made_up_word
from metalm.data.records import VQAExample
from metalm.data.segments import TextSegment
from metalm.evaluation.fastbind import make_episode
from metalm.evaluation.icl import build_prompt, prompt_to_sample
from metalm.evaluation.tasks import Example, builtin_task, in_model_layout
from metalm.training.config import ConfigError, StreamConfig, config_from_dict
from metalm.training.data import DataStream, StreamRecords
from metalm.training.episodes import EpisodeSampler, InContextSettings

COLORS = ("red", "blue", "green")


def _records(n: int = 24) -> list[VQAExample]:
    """VQA records over easy-VQA images: a colour question and a yes/no question per image."""
    from metalm.data.builtin import load_builtin

    caps = load_builtin("easy_vqa_captions", "train")[:n]
    out = []
    for i, cap in enumerate(caps):
        color = cap.text.split()[1]
        out.append(
            VQAExample(image=cap.image, question="what color is the shape?", answers=(color,), id=f"c{i}")
        )
        yes = "yes" if i % 2 else "no"
        out.append(VQAExample(image=cap.image, question="is there a red shape?", answers=(yes,), id=f"y{i}"))
    return out


def _stream(processor, settings: dict, *, seq_len: int = 400, seed: int = 0) -> DataStream:
    config = StreamConfig(source="easy_vqa_vqa", name="vqa", format="in_context", in_context=settings)
    spec = StreamRecords("vqa", 1.0, _records(), config)
    return DataStream([spec], processor, seq_len=seq_len, batch_size=1, seed=seed)


def _flat(sample) -> list:
    """A sample as a flat sequence: decoder token ids, and one entry per encoded segment."""
    out: list = []
    for seg in sample:
        if isinstance(seg, TextSegment):
            out += list(seg.ids)
        else:
            pixels = seg.pixel_values
            out.append(
                (seg.encoder, tuple(seg.input_ids) if seg.input_ids is not None else None,
                 None if pixels is None else round(float(pixels.double().sum()), 3))
            )  # fmt: skip
    return out


def _example(rec: VQAExample) -> Example:
    return Example(id=rec.id, fields={"question": rec.question}, answers=rec.answers, image=rec.image)


@pytest.mark.parametrize("shots", [0, 4])
def test_training_row_minus_its_answer_is_the_evaluation_prompt(tiny, shots):
    """An in-context row read up to its query's answer is exactly what k-shot evaluation sends the model."""
    model, processor = tiny
    data = _stream(processor, {"shots": [shots, shots], "same_task": 0.0})
    stream = data.streams[0]
    for _ in range(3):
        sample, used = stream.next_sample()
        assert len(used) == shots + 1
        assert isinstance(sample[-1], TextSegment) and sample[-1].loss
        records = [stream.records[j] for j in used]
        trained = SimpleNamespace(
            prompt_layouts={"vqa": {"template": "question: {question}", "prompt": "answer:"}}
        )
        task = in_model_layout(builtin_task("easyvqa"), trained)
        parts = build_prompt(task, _example(records[-1]), [_example(r) for r in records[:-1]])
        expected = prompt_to_sample(processor, parts)
        assert _flat(sample[:-1]) == _flat(expected)
        # The query's answer, then EOS, is what the row trains last.
        answer = processor.tokenize(" " + records[-1].answers[0]) + [processor.eos_token_id]
        assert list(sample[-1].ids) == answer


def test_every_answer_is_trained_and_nothing_else(tiny):
    _, processor = tiny
    stream = _stream(processor, {"shots": [3, 3], "same_task": 0.0}).streams[0]
    sample, used = stream.next_sample()
    trained = [seg for seg in sample if isinstance(seg, TextSegment) and seg.loss]
    assert len(trained) == len(used) == 4
    # The labelled positions are exactly the answers and their EOS, each predicted from the position before.
    batch = processor.collate([sample])
    labels = batch["labels"][0]
    expected = [i for seg in trained for i in seg.ids]
    assert labels[labels != -100].tolist() == expected
    # BOS opens the row once; every example but the first starts right after the previous EOS.
    bos = [i for s in sample if isinstance(s, TextSegment) for i in s.ids if i == processor.bos_token_id]
    assert len(bos) == 1


def test_relabelled_rows_train_only_words_shown_before(tiny):
    _, processor = tiny
    stream = _stream(processor, {"shots": [4, 6], "same_task": 1.0, "relabel": 1.0, "ways": [2, 2]}).streams[
        0
    ]
    real = {a for r in stream.records for a in r.answers}
    for _ in range(5):
        sample, used = stream.next_sample()
        answers = [
            seg
            for seg in sample
            if isinstance(seg, TextSegment) and len(seg.ids) > 1 and seg is not sample[0]
        ]
        labels = [s for s in sample if isinstance(s, TextSegment) and s.ids[-1] == processor.eos_token_id]
        words = [processor.decode(s.ids[:-1]).strip() for s in labels]
        assert len(words) == len(used) and not set(words) & real and not set(words) & set(HELD_OUT_WORDS)
        seen: set[str] = set()
        for seg, word in zip(labels, words):
            assert seg.loss == (word in seen)  # a word is trained only once it has been shown
            seen.add(word)
        assert labels[-1].loss  # the query's class is always shown before it
        assert len({stream.records[j].question for j in used}) == 1  # one task per row
        assert answers


def test_other_question_rows_keep_the_querys_own_answer(tiny):
    """Relabelled demonstrations of one question, then a query asking another: its real answer is trained,
    so that a model does not learn to answer every question with the demonstrations' words."""
    _, processor = tiny
    settings = {"shots": [3, 5], "same_task": 1.0, "relabel": 1.0, "ways": [2, 2], "other_question": 1.0}
    stream = _stream(processor, settings).streams[0]
    real = {a for r in stream.records for a in r.answers}
    for _ in range(6):
        sample, used = stream.next_sample()
        query, demos = stream.records[used[-1]], [stream.records[j] for j in used[:-1]]
        assert demos and len({d.question for d in demos}) == 1
        assert not {a for d in demos for a in d.answers} & set(query.answers)  # another task: other answers
        labels = [s for s in sample if isinstance(s, TextSegment) and s.ids[-1] == processor.eos_token_id]
        words = [processor.decode(s.ids[:-1]).strip() for s in labels]
        assert not set(words[:-1]) & real  # the demonstrations' answers are made-up words
        assert words[-1] == query.answers[0] and labels[-1].loss  # the query's own answer, trained


def test_rows_are_deterministic_and_fit_seq_len(tiny):
    _, processor = tiny
    a = _stream(processor, {"shots": [6, 8]}, seq_len=80).streams[0]
    b = _stream(processor, {"shots": [6, 8]}, seq_len=80).streams[0]
    for _ in range(4):
        (sa, ua), (sb, ub) = a.next_sample(), b.next_sample()
        assert ua == ub and _flat(sa) == _flat(sb)
        from metalm.data.segments import sample_length

        assert sample_length(sa, processor.config) <= 80
        assert len(ua) < 9  # earliest demonstrations left out to fit


def test_a_stream_may_set_its_own_row_length(tiny):
    _, processor = tiny
    config = StreamConfig(
        source="easy_vqa_vqa", name="vqa", format="in_context", in_context={"shots": [8, 8], "seq_len": 60}
    )
    data = DataStream([StreamRecords("vqa", 1.0, _records(), config)], processor, seq_len=400, batch_size=1)
    from metalm.data.segments import sample_length

    sample, used = data.streams[0].next_sample()
    assert sample_length(sample, processor.config) <= 60 and len(used) < 9


def test_packing_keeps_in_context_rows_longer_than_seq_len_whole(tiny):
    """`data.pack` with in-context rows longer than `data.seq_len` (their stream's own `in_context.seq_len`):
    a packed row is as long as the longest row its streams make, so every sample stays whole (before, the
    first such micro-batch stopped the run: "exceed the pack length")."""
    _, processor = tiny
    settings = {"shots": [4, 4], "seq_len": 100}
    config = StreamConfig(source="easy_vqa_vqa", name="vqa", format="in_context", in_context=settings)
    spec = StreamRecords("vqa", 1.0, _records(), config)

    def batch(pack: bool) -> dict:
        return DataStream([spec], processor, seq_len=40, batch_size=3, pack=pack).next_batch()

    padded, packed = batch(False), batch(True)
    assert 40 < padded["input_ids"].shape[1] <= 100  # rows longer than data.seq_len
    assert packed["attention_mask"].sum() == padded["attention_mask"].sum()  # the same positions, whole
    assert packed["input_ids"].shape[1] <= 100 and "sequence_ids" in packed


def test_query_attends_to_its_demonstrations(tiny):
    """Examples in one row are not isolated: changing a demonstration changes the query's logits."""
    model, processor = tiny
    stream = _stream(processor, {"shots": [2, 2], "same_task": 0.0}).streams[0]
    sample, _ = stream.next_sample()
    labels = [i for i, s in enumerate(sample) if isinstance(s, TextSegment) and s.loss]
    changed = list(sample)
    first = labels[0]
    changed[first] = TextSegment([processor.tokenize("purple")[0], *sample[first].ids[1:]], loss=True)
    with torch.no_grad():
        out = [model(**processor.collate([s])).logits[0, -3] for s in (sample, changed)]
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("kind", ["syllables", "letters"])
def test_made_up_words_avoid_the_evaluation_names(kind):
    rng = random.Random(0)
    words = {made_up_word(rng, kind) for _ in range(5000)}
    assert len(words) > 1000 and not words & set(HELD_OUT_WORDS)
    assert all(w.isalpha() and w.islower() for w in words)
    if kind == "letters":  # uniform letters: every letter, lengths 3 to 7
        assert set("".join(words)) == set(string.ascii_lowercase) and {len(w) for w in words} == {
            3,
            4,
            5,
            6,
            7,
        }


def test_episode_shows_the_query_class():
    recs = _records()
    sampler = EpisodeSampler(
        recs, InContextSettings(shots=(1, 1), same_task=1.0, ways=(3, 3)), range(len(recs))
    )
    counts = {a: sum(r.answers == a for r in recs) for a in {r.answers for r in recs}}
    for q in range(0, len(recs), 2):
        episode = sampler.draw(q, random.Random(q))
        assert q not in episode.demonstrations
        # The query's class is shown, unless the query is its only member (then the row cannot show it).
        shown = [recs[d].answers for d in episode.demonstrations]
        assert shown == ([recs[q].answers] if counts[recs[q].answers] > 1 else [])


def test_query_repeated_rows_show_the_query_itself_once():
    recs = _records()
    settings = InContextSettings(shots=(3, 3), same_task=1.0, ways=(2, 2), query_repeated=1.0)
    sampler = EpisodeSampler(recs, settings, range(len(recs)))
    for q in range(len(recs)):
        episode = sampler.draw(q, random.Random(q))
        assert episode.demonstrations.count(q) == 1
    # Without the option (the default 0), rows are drawn as before: never the query itself.
    plain = EpisodeSampler(recs, settings.model_copy(update={"query_repeated": 0.0}), range(len(recs)))
    assert all(q not in plain.draw(q, random.Random(q)).demonstrations for q in range(len(recs)))


def test_demonstrations_follow_a_balanced_streams_weights_only_when_asked():
    recs = _records()
    weights = [1.0 if rec.id.startswith("y") else 0.0 for rec in recs]  # only the yes/no records weigh
    settings = InContextSettings(shots=(4, 4), same_task=0.0)
    for balanced, expected in ((True, {"y"}), (False, {"c", "y"})):
        s = settings.model_copy(update={"balanced_demonstrations": balanced})
        sampler = EpisodeSampler(recs, s, range(len(recs)), weights)
        kinds = {
            recs[d].id[0] for q in range(len(recs)) for d in sampler.draw(q, random.Random(q)).demonstrations
        }
        assert kinds == expected


def test_in_context_settings_are_checked():
    with pytest.raises(ValueError, match="shots"):
        InContextSettings(shots=(4, 2))
    stream = {"source": "easy_vqa_vqa", "format": "instruction", "in_context": {"shots": [1, 2]}}
    base = {"model": {"decoder": {"model_type": "llama"}}, "data": {"streams": [stream]}}
    with pytest.raises(ConfigError, match="in_context"):
        config_from_dict(base)
    assert StreamConfig(source="easy_vqa_vqa", format="in_context").in_context == InContextSettings()


def test_fast_binding_episode():
    pool = [Example(f"d{i}", {"question": "q"}, (c,), image=f"{i}.png") for i, c in enumerate(COLORS * 10)]
    query = Example("q", {"question": "q"}, ("blue",), image="q.png")
    demos, asked = make_episode(query, pool, 3, random.Random(1), ways=2, made_up=True)
    assert len(demos) == 6 and asked.answers[0] in HELD_OUT_WORDS
    names = {d.answers[0] for d in demos}
    assert len(names) == 2 and asked.answers[0] in names and names <= set(HELD_OUT_WORDS)
    real, asked = make_episode(query, pool, 2, random.Random(1), ways=2, made_up=False)
    assert asked.answers == ("blue",) and {d.answers[0] for d in real} <= set(COLORS)


def test_fast_binding_is_unsolvable_without_demonstrations(tiny):
    from metalm.evaluation.runner import evaluate

    model, processor = tiny
    summary = evaluate(
        model,
        processor,
        builtin_task("fastbind-shape-2way"),
        shots=[0, 1],
        seeds=[0],
        limit=4,
        progress=False,
    )
    by_k = summary["results"]["fastbind-shape-2way"]
    assert by_k["0"]["mean"]["accuracy"] == 0.0 and by_k["1"]["n"] == 4


def test_ranked_fast_binding_chooses_among_the_episode_names(tiny, tmp_path):
    """The ranked twin scores the same episodes' names by likelihood: every prediction is one of the query's
    episode names (so k = 0 is at chance, not 0 %), and the generated task's episodes are the same ones."""
    from metalm.evaluation.breakdown import read_predictions
    from metalm.evaluation.runner import evaluate

    model, processor = tiny
    for name in ("fastbind-shape-2way-ranked", "fastbind-shape-2way"):
        evaluate(model, processor, builtin_task(name), shots=[0, 1], seeds=[0], limit=4, out_dir=tmp_path,
                 progress=False)  # fmt: skip
    for k in (0, 1):
        ranked = read_predictions(tmp_path / f"predictions-fastbind-shape-2way-ranked-k{k}-s0.jsonl")
        generated = read_predictions(tmp_path / f"predictions-fastbind-shape-2way-k{k}-s0.jsonl")
        for r, g in zip(ranked, generated):
            assert r["prompt"] == g["prompt"] and r["gold"] == g["gold"]
            assert len(r["option_scores"]) == 2 and r["gold"] in r["option_scores"]
            assert r["prediction"] in r["option_scores"] and set(r["option_scores"]) <= set(HELD_OUT_WORDS)


def test_fast_binding_text_twin_gives_each_image_as_its_caption():
    from metalm.data.builtin import load_builtin

    task, twin = builtin_task("fastbind-shape-2way"), builtin_task("fastbind-shape-2way-text")
    images, texts = task.load("test")[:20], twin.load("test")[:20]
    captions = {r.image: r.text for r in load_builtin("easy_vqa_captions", "test")}
    for image, text in zip(images, texts):
        assert text.image is None and text.answers == image.answers
        assert text.fields["question"] == f"{captions[image.image]} {image.fields['question']}"
        assert image.answers[0] in text.fields["question"]  # perception given: only the name is unknown
    pool = twin.load("train")
    demos, asked = twin.episodes(texts[0], pool, 2, 0, 0)
    assert len(demos) == 4 and all(d.image is None for d in demos)
    assert {d.answers[0] for d in demos} <= set(HELD_OUT_WORDS) and asked.answers[0] in HELD_OUT_WORDS


def test_ask_color_shows_the_binding_episodes_then_asks_the_querys_colour():
    from metalm.data.builtin import load_builtin

    binding, asking = builtin_task("fastbind-shape-2way"), builtin_task("fastbind-shape-2way-ask-color")
    queries, pool = binding.load("test")[:6], binding.load("train")
    captions = {r.image: r.text for r in load_builtin("easy_vqa_captions", "test")}
    for index, query in enumerate(queries):
        demos, bound = binding.episodes(query, pool, 2, 1, index)
        same, asked = asking.episodes(query, pool, 2, 1, index)
        assert same == demos and {d.answers[0] for d in demos} <= set(HELD_OUT_WORDS)  # the very episodes
        assert asked.fields["question"] == "what color is the shape?" and asked.options is None
        assert captions[query.image] == f"a {asked.answers[0]} {query.answers[0]}."  # its real colour
        assert bound.answers[0] in HELD_OUT_WORDS


def test_interleaved_documents_refer_back_across_images():
    from metalm.data.builtin import load_builtin
    from metalm.data.records import ImagePart, TextPart

    docs = load_builtin("easy_vqa_documents", "validation")
    images = [p.image for d in docs for p in d.parts if isinstance(p, ImagePart)]
    assert len(images) == len(set(images)) == len(load_builtin("easy_vqa_captions", "validation"))
    captions = {r.image: r.text for r in load_builtin("easy_vqa_captions", "validation")}
    for n, doc in enumerate(docs):
        assert (1 if n == len(docs) - 1 else 3) <= len(doc.parts) // 2 <= 5  # the last takes what is left
        seen: list[tuple[str, str]] = []
        for image, text in zip(doc.parts[::2], doc.parts[1::2]):
            assert isinstance(image, ImagePart) and isinstance(text, TextPart)
            color, shape = captions[image.image][2:-1].split()
            assert text.text.startswith(f"a {color} {shape}")
            if any(s == shape for _, s in seen):
                first = next(i for i, (_, s) in enumerate(seen) if s == shape)
                assert text.text.endswith(
                    f"the same shape as the {('first', 'second', 'third', 'fourth')[first]}."
                )
            seen.append((color, shape))


def test_in_context_report_table(tiny, tmp_path):
    from metalm.evaluation.in_context import evaluate_in_context, in_context_lines

    model, processor = tiny
    evaluate_in_context(
        model, processor, tmp_path, limit=4, seeds=[0, 1], shots=(0, 1), fastbind=("fastbind-shape-2way",),
        progress=False,
    )  # fmt: skip
    lines = in_context_lines(tmp_path, shots=(0, 1))
    assert lines[0] == "| task | k = 0 | k = 1 | change k = 0 → 1 (95 % interval) |"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert "easy-VQA (n=4)" in rows and "fastbind-shape-2way (n=4)" in rows
    assert rows["fastbind-shape-2way (n=4)"].split(" | ")[1] == "–"  # no k = 0 for made-up names
    assert "±" in rows["easy-VQA (n=4)"].split(" | ")[2]  # two seeds at k = 1: a spread


def test_in_context_table_per_type_with_paired_change(tiny, tmp_path):
    """per_type asks as many questions of each type; each type's row ends with its k = 0 -> k change, which
    is the paired change computed from the very prediction files."""
    from metalm.evaluation.breakdown import image_answer_group, paired_change_by_group
    from metalm.evaluation.in_context import easy_vqa_questions, evaluate_in_context, in_context_lines

    model, processor = tiny
    evaluate_in_context(
        model, processor, tmp_path, limit=2, per_type=3, seeds=[0, 1], shots=(0, 1), fastbind=(),
        progress=False,
    )  # fmt: skip
    lines = in_context_lines(tmp_path, shots=(0, 1))
    assert lines[0] == "| task | k = 0 | k = 1 | change k = 0 → 1 (95 % interval) |"
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines[2:]}
    assert "easy-VQA, 3 of each type (n=9)" in rows
    change = paired_change_by_group(tmp_path / "easyvqa", "easyvqa", 0, 1)
    for qtype in ("colour", "shape", "yes/no"):
        cells = rows[f"easy-VQA {qtype} (n=3)"]
        assert cells[-1].rstrip(" |") == f"{change[qtype]['mean']:+.1f} ± {change[qtype]['ci95']:.1f}"
    assert rows["easy-VQA, 3 of each type (n=9)"][-1].rstrip(" |") == "–"
    # The yes/no questions again, split by what the image answers: their counts add up, each with its change.
    by_image = {row: cells for row, cells in rows.items() if row.startswith("easy-VQA yes/no, ")}
    assert sum(int(row.rsplit("(n=", 1)[1].rstrip(")")) for row in by_image) == 3
    split = paired_change_by_group(
        tmp_path / "easyvqa", "easyvqa", 0, 1, image_answer_group(easy_vqa_questions())
    )
    for key, c in split.items():
        (row,) = [r for r in by_image if r.startswith(f"easy-VQA yes/no, {key} (")]
        assert by_image[row][-1].rstrip(" |") == f"{c['mean']:+.1f} ± {c['ci95']:.1f}"


def test_made_up_repeats_show_made_up_words_three_times():
    from metalm.data.builtin import load_builtin

    docs = load_builtin("made_up_repeats", "validation")
    assert len(docs) == 500 and docs == load_builtin("made_up_repeats", "validation")
    for doc in docs:
        first, second, third = doc.text.rstrip(".").split(". ")
        assert first == second == third and 3 <= len(first.split()) <= 8
        assert not set(first.split()) & set(HELD_OUT_WORDS)
    assert docs[0].text != load_builtin("made_up_repeats", "test")[0].text
