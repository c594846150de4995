"""The lm-evaluation-harness adapter: the harness's numbers must be the ones computed here independently
(sample by sample, with the model and processor directly), not merely a run that finishes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from metalm import Encode, Target, TextSegment
from metalm.data.processor import continuation_pieces
from metalm.evaluation.runner import score_samples

REPO = Path(__file__).resolve().parents[1]
LM_EVAL_TASKS = REPO / "tests" / "data" / "lm_eval_task"
LIMIT = 3


def _docs() -> list[dict]:
    lines = (LM_EVAL_TASKS / "tiny.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:LIMIT]]


@pytest.fixture(scope="module")
def harness_run(tiny_saved):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import metalm.evaluation.lm_eval_adapter  # noqa: F401  (registers the "metalm" model)

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.chdir(REPO)  # the task's data_files path is relative to the repository root
    try:
        return lm_eval.simple_evaluate(
            model="metalm",
            model_args={"pretrained": str(tiny_saved), "encode_context": "true", "device": "cpu"},
            tasks=["metalm_tiny_mc", "metalm_tiny_gen", "metalm_tiny_ppl"],
            task_manager=TaskManager(include_path=str(LM_EVAL_TASKS), include_defaults=False),
            limit=LIMIT,
            batch_size=4,
            log_samples=True,
        )
    finally:
        mp.undo()


def _loaded(tiny_saved):
    from metalm import MetaLMProcessor
    from metalm.model.modeling_metalm import MetaLMForCausalLM

    return MetaLMForCausalLM.from_pretrained(tiny_saved).eval(), MetaLMProcessor.from_pretrained(tiny_saved)


def test_multiple_choice_accuracy_is_the_argmax_of_our_own_scores(harness_run, tiny_saved):
    model, processor = _loaded(tiny_saved)
    correct = []
    for doc in _docs():
        context = f"Question: {doc['question']}\nAnswer:"
        # BOS, the context through the text encoder, the choice as scored decoder text.
        samples = [[Encode(context), Target(" " + choice)] for choice in doc["choices"]]
        built = [processor.build_sample(s) for s in samples]
        scores = [s for s, _, _ in score_samples(model, processor, built)]
        correct.append(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
        logged = next(
            x for x in harness_run["samples"]["metalm_tiny_mc"] if x["doc"]["question"] == doc["question"]
        )
        harness_scores = [float(r[0][0]) for r in logged["resps"]]
        assert harness_scores == pytest.approx(scores, abs=1e-4)
    assert harness_run["results"]["metalm_tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / LIMIT)


def test_word_perplexity_is_our_own_log_likelihood_over_words(harness_run, tiny_saved):
    model, processor = _loaded(tiny_saved)
    total, words = 0.0, 0
    for doc in _docs():
        ids = processor.tokenize(doc["text"])
        prefix = processor.bos_token_id if processor.bos_token_id is not None else processor.eos_token_id
        sample = [TextSegment([prefix], loss=False), TextSegment(ids, loss=True)]
        total += score_samples(model, processor, [sample])[0][0]
        words += len(doc["text"].split())
    expected = math.exp(-total / words)
    assert harness_run["results"]["metalm_tiny_ppl"]["word_perplexity,none"] == pytest.approx(
        expected, rel=1e-4
    )


def test_generation_is_greedy_decoding_cut_at_the_stop_string(harness_run, tiny_saved):
    model, processor = _loaded(tiny_saved)
    matches = []
    for doc in _docs():
        context = f"Question: {doc['question']}\nAnswer:"
        batch = processor([[Encode(context)]])
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=processor.pad_token_id,
                # An answer starts a new word: never a WordPiece continuation piece (as metalm generates).
                begin_suppress_tokens=continuation_pieces(processor.tokenizer),
            )
        text = processor.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).split("\n")[
            0
        ]
        logged = next(
            x for x in harness_run["samples"]["metalm_tiny_gen"] if x["doc"]["question"] == doc["question"]
        )
        assert logged["resps"][0][0].strip() == text.strip()
        matches.append(text.strip().lower() == doc["choices"][doc["label"]].lower())
    em = harness_run["results"]["metalm_tiny_gen"]["exact_match,none"]
    assert em == pytest.approx(sum(matches) / LIMIT)


def test_adapter_builds_encoder_or_decoder_contexts_and_scores_them(tiny):
    pytest.importorskip("lm_eval")
    from metalm.evaluation.lm_eval_adapter import MetaLMHarnessLM

    # The context goes to the encoder with encode_context, to the decoder otherwise; the scores are
    # the processor-built samples' log-likelihoods.
    model, processor = tiny
    enc = MetaLMHarnessLM(model=model, processor=processor, encode_context=True, device="cpu")
    dec = MetaLMHarnessLM(model=model, processor=processor, device="cpu")
    s_enc = enc._loglikelihood_sample("Question: sky? Answer:", " blue")
    s_dec = dec._loglikelihood_sample("Question: sky? Answer:", " blue")
    assert [type(s).__name__ for s in s_enc] == ["TextSegment", "EncodedSegment", "TextSegment"]
    assert all(isinstance(s, TextSegment) for s in s_dec) and s_dec[-1].loss and not s_dec[1].loss

    class Req:
        def __init__(self, *args):
            self.args = args

    ((lp, greedy),) = dec.loglikelihood([Req("Question: sky? Answer:", " blue")], disable_tqdm=True)
    assert lp == pytest.approx(score_samples(model, processor, [s_dec])[0][0], abs=1e-5)
    (text,) = dec.generate_until(
        [Req("Question: sky? Answer:", {"until": ["\n"], "max_gen_toks": 3})], disable_tqdm=True
    )
    assert isinstance(text, str)
    (total,) = dec.loglikelihood_rolling([Req("the cat sat on the mat " * 100)], disable_tqdm=True)
    assert total < 0


def test_requests_with_one_context_share_one_run_of_it(tiny, monkeypatch):
    pytest.importorskip("lm_eval")
    from metalm.evaluation import lm_eval_adapter
    from metalm.evaluation.lm_eval_adapter import MetaLMHarnessLM

    model, processor = tiny

    class Req:
        def __init__(self, *args):
            self.args = args

    contexts = ["Question: sky? Answer:", "Question: grass, in the summer? Answer:"]
    requests = [Req(c, o) for c in contexts for o in (" blue", " green", " a deep red")]
    prompts_run = []
    real = lm_eval_adapter.score_continuations

    def counting(model, processor, prompts, continuations):
        prompts_run.extend(prompts)
        return real(model, processor, prompts, continuations)

    monkeypatch.setattr(lm_eval_adapter, "score_continuations", counting)
    for encode in (True, False):
        prompts_run.clear()
        lm = MetaLMHarnessLM(
            model=model, processor=processor, encode_context=encode, device="cpu", batch_size=4
        )
        got = lm.loglikelihood(requests, disable_tqdm=True)
        # With encoded contexts, each context runs once; as decoder text, a continuation's first piece may
        # merge with the context, so only the contexts that tokenize alike are shared.
        assert len(prompts_run) == 2 if encode else 2 <= len(prompts_run) <= 6
        for req, (lp, greedy) in zip(requests, got):
            ((expected, _, expected_greedy),) = score_samples(
                model, processor, [lm._loglikelihood_sample(*req.args)]
            )
            assert lp == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    # Rolling windows (each window's context different): the sum of each window scored as a whole sequence.
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    lm = MetaLMHarnessLM(model=model, processor=processor, device="cpu", batch_size=4)
    text = "the cat sat on the mat " * 100
    (total,) = lm.loglikelihood_rolling([Req(text)], disable_tqdm=True)
    windows = get_rolling_token_windows(processor.tokenize(text), lm.prefix_token_id, lm.max_length - 1, 1)
    expected = sum(
        score_samples(
            model, processor, [[TextSegment(list(c), loss=False), TextSegment(list(p), loss=True)]]
        )[0][0]
        for c, p in map(make_disjoint_window, windows)
    )
    assert math.isfinite(total) and total == pytest.approx(expected, abs=1e-3)
