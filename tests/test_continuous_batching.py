"""Continuous batching (metalm.serving.continuous): requests that join and leave one running batch between
decode steps give exactly the greedy answers they get alone and through the dynamic batcher's `generate`;
encoders run once per newcomer; finished rows leave at once; decoders whose cache cannot be joined fall
back to dynamic batching; the prefill computes logits for the last position only."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from metalm.serving import continuous
from metalm.serving.continuous import continuous_unsupported
from metalm.serving.engine import Engine
from metalm.serving.request_types import ChatMessage, SamplingParams
from tests.conftest import TINY_LLAMA, build_tiny

GEMMA3 = {
    "model_type": "gemma3_text",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "sliding_window": 16,
}
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}


def image(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.new("RGB", size, colour)


# Prompts of different lengths and kinds, each with its own token budget (rows leave at different steps).
PROMPTS = [
    ([ChatMessage("user", "hello")], 10),
    ([ChatMessage("user", "describe the picture in a few words please", [image((10, 200, 10))])], 14),
    ("a raw prompt that is a little longer than the others, with more words in it", 6),
    ([ChatMessage("user", "two pictures", [image((200, 0, 0)), image((0, 0, 250), (40, 24))])], 12),
    ("short", 16),
]


def greedy(tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0.0, n=n)


@pytest.fixture(scope="module")
def model_and_processor():
    return build_tiny(seed=1)


def slowed(engine: Engine, seconds: float) -> Engine:
    """Each decoded token costs `seconds` more, so that later arrivals find rows still running."""
    decode = engine.runner.decode

    def slow_decode(ids):
        time.sleep(seconds)
        return decode(ids)

    engine.runner.decode = slow_decode
    return engine


def test_staggered_arrivals_give_the_answers_of_each_alone(model_and_processor):
    model, processor = model_and_processor
    dynamic = Engine(model, processor, device="cpu", batching="dynamic")
    alone = [dynamic.generate(prompt, greedy(t)).completions[0].token_ids for prompt, t in PROMPTS]
    jobs = [dynamic.submit(prompt, greedy(t)) for prompt, t in PROMPTS]
    assert [j.result(timeout=60).completions[0].token_ids for j in jobs] == alone  # generate, batched
    dynamic.close()

    engine = slowed(Engine(model, processor, device="cpu"), 0.01)
    assert engine.batching == "continuous" and engine.batching_note is None
    assert [engine.generate(p, greedy(t)).completions[0].token_ids for p, t in PROMPTS] == alone
    try:
        jobs = []
        for prompt, tokens in PROMPTS:  # each arrives while the earlier ones are decoding
            jobs.append(engine.submit(prompt, greedy(tokens)))
            time.sleep(0.04)
        results = [j.result(timeout=60).completions[0] for j in jobs]
    finally:
        engine.close()
    assert [r.token_ids for r in results] == alone
    assert [r.text for r in results] == [engine.processor.decode(ids) for ids in alone]
    sizes = engine.runner.batch_sizes[len(PROMPTS) :]  # rows running right after each join
    assert sizes[0] == 1 and max(sizes) > 1, sizes  # newcomers joined a running batch
    assert engine.pending == 0


def test_finished_rows_leave_at_once(model_and_processor, monkeypatch):
    model, processor = model_and_processor
    rows_per_step: list[int] = []
    step = continuous.RunningBatch.step

    def counting_step(self):
        rows_per_step.append(len(self))
        return step(self)

    monkeypatch.setattr(continuous.RunningBatch, "step", counting_step)
    engine = slowed(Engine(model, processor, device="cpu"), 0.01)
    try:
        long = engine.submit("a long answer", greedy(30))
        time.sleep(0.05)
        short = engine.submit("a short one", greedy(3))
        short_result = short.result(timeout=60)
        long_result = long.result(timeout=60)
    finally:
        engine.close()
    assert len(short_result.completions[0].token_ids) <= 3
    assert short.finished < long.finished - 0.1  # answered while the long row still decodes
    two = [i for i, n in enumerate(rows_per_step) if n == 2]
    assert two and rows_per_step[two[-1] + 1 :] and set(rows_per_step[two[-1] + 1 :]) == {1}
    assert (
        len(long_result.completions[0].token_ids) == 30 or long_result.completions[0].finish_reason == "stop"
    )


def test_encoders_run_once_per_newcomer(model_and_processor, monkeypatch):
    model, processor = model_and_processor
    calls: list[str] = []
    encode = model.encode_padded  # where every encoder call goes (embed_inputs, encode)

    def counting_encode(name, payload):
        calls.append(name)
        return encode(name, payload)

    monkeypatch.setattr(model, "encode_padded", counting_encode)
    engine = Engine(model, processor, device="cpu")
    prompt = [ChatMessage("user", "what is this", [image((120, 30, 90))])]
    result = engine.generate(prompt, greedy(8, n=3))
    assert sorted(calls) == ["text", "vision"]  # one prefill for the three choices
    texts = [c.text for c in result.completions]
    assert len(texts) == 3 and len(set(texts)) == 1
    calls.clear()
    jobs = [engine.submit(prompt, greedy(5)), engine.submit("another", greedy(5))]
    for job in jobs:
        job.result(timeout=60)
    engine.close()
    assert calls.count("vision") == 1


def test_sampling_seeds_and_cancellation_in_the_running_batch(model_and_processor):
    model, processor = model_and_processor
    engine = slowed(Engine(model, processor, device="cpu"), 0.005)
    try:
        cancelled = engine.submit("never mind", greedy(40))
        sampled = engine.submit("tell me", SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.8, n=2))
        seeded = [
            engine.submit("tell me", SamplingParams(max_new_tokens=6, temperature=0.9, seed=7)) for _ in "ab"
        ]
        time.sleep(0.05)
        cancelled.cancel()
        assert len(sampled.result(timeout=60).completions) == 2
        first, second = (job.result(timeout=60).completions[0].text for job in seeded)
        assert first == second  # each seeded job draws from its own generator: reproducible
        assert cancelled.result(timeout=60).completions[0].finish_reason == "cancelled"
    finally:
        engine.close()
    assert engine.pending == 0


def test_a_failing_newcomer_fails_alone(model_and_processor, monkeypatch):
    """A prefill that raises fails its own request only: rows already running and a newcomer prefilled in
    the same group go on, with their answers unchanged."""
    model, processor = model_and_processor
    engine = slowed(Engine(model, processor, device="cpu"), 0.01)
    join = continuous.RunningBatch.join
    groups: list[int] = []

    def failing_join(self, batch, rows_per_prompt):
        groups.append(len(rows_per_prompt))
        if any(rows[0].job.prompt.num_tokens == bad_len for rows in rows_per_prompt):
            raise RuntimeError("boom")
        return join(self, batch, rows_per_prompt)

    monkeypatch.setattr(continuous.RunningBatch, "join", failing_join)
    bad_prompt = engine.prepare("this one fails in its prefill, whatever happens")
    bad_len = bad_prompt.num_tokens
    fine = engine.prepare("fine")
    expected = [engine.generate(p, greedy(12)).completions[0].token_ids for p in ("a good one", fine)]
    try:
        good = engine.submit("a good one", greedy(12))
        time.sleep(0.04)
        with engine.runner.model_lock:  # both newcomers are queued before the next step: one prefill group
            bad = engine.submit(bad_prompt, greedy(4))
            other = engine.submit(fine, greedy(12))
        with pytest.raises(RuntimeError, match="generation failed"):
            bad.result(timeout=60)
        assert good.result(timeout=60).completions[0].token_ids == expected[0]
        assert other.result(timeout=60).completions[0].token_ids == expected[1]
    finally:
        engine.close()
    assert engine.pending == 0
    assert 2 in groups  # the bad request and "fine" were prefilled as one group first, then one by one


def test_a_sliding_window_decoder_falls_back_to_dynamic_batching():
    model, processor = build_tiny(decoder=GEMMA3)
    reason = continuous_unsupported(model)
    assert reason and "sliding" in reason
    engine = Engine(model, processor, device="cpu")
    assert engine.batching == "dynamic" and "continuous batching is not available" in engine.batching_note
    job = engine.submit("hello", greedy(4))
    assert job.result(timeout=60).completions
    engine.close()
    with pytest.raises(ValueError):
        Engine(model, processor, device="cpu", batching="paged")


def test_gpt2_decoder_joins_rows_too():
    """Learned absolute positions (GPT-2) read the same per-row position ids."""
    model, processor = build_tiny(decoder=GPT2)
    assert continuous_unsupported(model) is None
    dynamic = Engine(model, processor, device="cpu", batching="dynamic")
    engine = Engine(model, processor, device="cpu")
    for prompt, tokens in PROMPTS[:3]:
        expected = dynamic.generate(prompt, greedy(tokens)).completions[0].token_ids
        assert engine.generate(prompt, greedy(tokens)).completions[0].token_ids == expected
    jobs = [engine.submit(prompt, greedy(tokens)) for prompt, tokens in PROMPTS]
    batched = [j.result(timeout=60).completions[0].token_ids for j in jobs]
    assert batched == [dynamic.generate(p, greedy(t)).completions[0].token_ids for p, t in PROMPTS]
    engine.close()


def test_prefill_computes_logits_for_the_last_position_only(model_and_processor):
    """Issue #14 item 3: `generate` and the running batch run the LM head on one position per row."""
    model, processor = model_and_processor
    head_positions: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_positions.append(args[0].shape[1])
    )
    try:
        batch = processor([["a prompt of several words for the decoder"], ["two"]], padding_side="left")
        batch.pop("labels")
        assert batch["input_ids"].shape[1] > 2
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=processor.pad_token_id)
        assert head_positions == [1, 1, 1]
        head_positions.clear()
        Engine(model, processor, device="cpu").generate("a prompt of several words", greedy(3))
        assert head_positions and set(head_positions) == {1}
    finally:
        hook.remove()


def test_left_padding_is_cut_when_rows_leave():
    """The cache keeps no column that only padding uses, so it does not grow with the batch's history."""
    model, processor = build_tiny(seed=2, decoder=TINY_LLAMA)
    engine = Engine(model, processor, device="cpu")
    running = continuous.RunningBatch(model, engine.runner.begin_suppress)
    wide = engine._new_job("a much longer prompt than the other one, with many words in it", greedy(2))
    narrow = engine._new_job("hi", greedy(20))
    engine.runner.join_running(running, [wide])
    engine.runner.join_running(running, [narrow])
    assert len(running) == 2 and not bool(running.mask.all())  # the narrow row is left-padded
    while not wide.done:
        engine.runner.step_running(running)
    assert len(running) == 1 and bool(running.mask.all())  # its padding columns are gone
    assert running.cache.layers[0].keys.shape[2] == running.mask.shape[1]
    while len(running):
        engine.runner.step_running(running)
    alone = engine.generate("hi", greedy(20)).completions[0].token_ids
    assert narrow.result().completions[0].token_ids == alone


def test_closing_the_engine_fails_running_and_waiting_jobs(model_and_processor):
    model, processor = model_and_processor
    engine = slowed(Engine(model, processor, device="cpu", max_batch_size=1), 0.02)
    running = engine.submit("a long answer", greedy(60))
    waiting = engine.submit("no room for this one yet", greedy(4))  # the batch holds one row
    time.sleep(0.1)
    engine.close()
    for job in (running, waiting):
        with pytest.raises(RuntimeError, match="shutting down"):
            job.result(timeout=10)
    assert engine.pending == 0


# --- seeded requests share the running batch (issue #24) ---
def test_seeded_requests_do_not_hold_up_the_batch(tiny):
    """Six long seeded samplers, then a short unseeded request: it joins the running batch at once (it
    used to wait for every seeded job to run alone, one after another: 80 s in the issue). A seeded
    answer stays the same whatever runs beside it."""
    model, processor = tiny
    engine = Engine(model, processor, device="cpu", name="tiny").start()
    hot = SamplingParams(max_new_tokens=150, temperature=2.0, seed=11)
    try:
        alone = engine.submit("tell me", SamplingParams(max_new_tokens=12, temperature=0.9, seed=5)).result(
            60
        )
        seeded = [engine.submit("tell me a story", hot) for _ in range(6)]
        start = time.monotonic()
        normal = engine.submit("hi", SamplingParams(max_new_tokens=4, temperature=0.0))
        beside = engine.submit("tell me", SamplingParams(max_new_tokens=12, temperature=0.9, seed=5))
        normal.result(60)
        waited = time.monotonic() - start
        results = [job.result(120) for job in seeded]
        last_seeded = max(job.finished for job in seeded)
        print(f"\nnormal request answered in {waited:.2f} s beside six seeded samplers")
        assert waited < 1.5 and normal.finished < last_seeded
        assert beside.result(60).completions[0].text == alone.completions[0].text
        assert len({r.completions[0].text for r in results}) == 1  # the same seed, the same answer
    finally:
        engine.close()
