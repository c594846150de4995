"""Ranking options: each prompt run once with its options read from its KV cache (``score_continuations``,
what ``metalm eval`` does) against every option as a whole sequence, prompt included (``score_samples``,
the baseline). BBC-topic prompts of a saved model (five topics, ``--shots`` demonstrations through the
encoder), ``--batch`` prompts per call (the baseline: as many sequences per forward as ``metalm eval``
used to send); both paths timed on the same prompts, interleaved, median of ``--repeats``; the largest
difference between the two paths' scores is printed beside the ratio.

    python benchmarks/ranked_options.py --model runs/gemma-vl-icl-yn/final --shots 1,4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metalm.data.segments import TextSegment
from metalm.evaluation.experiments import load_model
from metalm.evaluation.icl import build_prompt, encoder_fits, prompt_to_sample, sample_demonstrations
from metalm.evaluation.protocol import in_model_layout
from metalm.evaluation.scoring import score_continuations, score_samples
from metalm.evaluation.tasks import get_task


def _prompts(model, processor, k: int, count: int):
    task = in_model_layout(get_task("bbc-topic"), model.config)
    queries, pool = task.examples(task.eval_split)[:count], task.examples(task.demo_split)
    fits = encoder_fits(processor)
    prompts = [
        prompt_to_sample(
            processor, build_prompt(task, ex, sample_demonstrations(pool, k, seed=0, index=i), fits=fits)
        )
        for i, ex in enumerate(queries)
    ]
    options = [[processor.tokenize(task.render_target(o)) for o in task.options_for(ex)] for ex in queries]
    return prompts, options


def _whole(model, processor, prompts, options, batch: int) -> list[float]:
    samples = [[*p, TextSegment(ids, loss=True)] for p, opts in zip(prompts, options) for ids in opts]
    return [
        s
        for i in range(0, len(samples), batch)
        for s, _, _ in score_samples(model, processor, samples[i : i + batch])
    ]


def _shared(model, processor, prompts, options, batch: int) -> list[float]:
    return [
        s
        for i in range(0, len(prompts), batch)
        for row in score_continuations(model, processor, prompts[i : i + batch], options[i : i + batch])
        for s, _, _ in row
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="runs/quickstart/final", help="a saved MetaLM with a text encoder")
    parser.add_argument("--shots", default="1,4")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    print(
        f"{args.model}: {args.prompts} BBC prompts, batch {args.batch}, {args.threads} threads, median of {args.repeats}"
    )
    for k in (int(v) for v in args.shots.split(",")):
        prompts, options = _prompts(model, processor, k, args.prompts)
        times: dict[str, list[float]] = {"whole": [], "shared": []}
        scores = {}
        for _ in range(args.repeats):
            for name, run in (("whole", _whole), ("shared", _shared)):
                start = time.perf_counter()
                scores[name] = run(model, processor, prompts, options, args.batch)
                times[name].append(time.perf_counter() - start)
        sequences = sum(map(len, options))
        whole, shared = (statistics.median(times[n]) for n in ("whole", "shared"))
        gap = max(abs(a - b) for a, b in zip(scores["whole"], scores["shared"]))
        print(
            f"k={k}: whole sequences {sequences / whole:.2f} options/s, prompt once {sequences / shared:.2f} "
            f"options/s: {whole / shared:.2f}x; largest score difference {gap:.2e} nats"
        )


if __name__ == "__main__":
    main()
