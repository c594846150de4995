"""Few-shot serving with and without the engine's feature cache (`metalm serve --feature-cache-mb`).

A server given `--demos` shows its demonstrations before every request, and each one's image and question
go through the encoders again; with the cache (in memory only, the default 256 MB) the frozen encoder parts
read what they computed for the demonstrations at the first request. This asks a saved model easy-VQA test
questions with `--shots` demonstrations from the training split in the layout `metalm serve --demos` sends
(`PromptBuilder.demonstration_parts` then the request), one request after another through `Engine.generate`
(greedy, `--new-tokens`), two ways in the same run: the cache off (`feature_cache_mb=0`) and on, alternating
`--repeats` times so that drift hits both alike. `--choose first` shows the same demonstrations every time (a
fixed pool); `random` draws `--shots` of a pool of `--pool` per request, as `--choose random` does. It prints
each one's seconds per request, the ratio and how many answers differ from the uncached ones.

    OMP_NUM_THREADS=2 python benchmarks/serve_demonstrations.py --model runs/quickstart/final
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from metalm.data.builtin import load_builtin
from metalm.serving.engine import Engine
from metalm.serving.request_types import Demonstration, SamplingParams


def requests(engine: Engine, args: argparse.Namespace) -> list[list]:
    train = load_builtin("easy_vqa_vqa", "train")
    test = random.Random(1).sample(load_builtin("easy_vqa_vqa", "test"), args.requests)
    pool = [
        Demonstration(r.answers[0], r.question, [r.image]) for r in random.Random(0).sample(train, args.pool)
    ]
    prompts, draw = engine.prompts, random.Random(2)
    out = []
    for record in test:
        shown = pool[: args.shots] if args.choose == "first" else draw.sample(pool, args.shots)
        query = prompts.request_parts(question=record.question, images=[record.image])
        out.append(prompts.demonstration_parts(shown) + query)
    return out


def timed(engine: Engine, prompts: list[list], params: SamplingParams) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    answers = [engine.generate(prompt, params).completions[0].token_ids for prompt in prompts]
    return (time.perf_counter() - start) / len(prompts), answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/quickstart/final", help="a saved MetaLM folder")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--choose", choices=["first", "random"], default="first")
    p.add_argument("--pool", type=int, default=32, help="demonstrations to choose from (--choose random)")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    engines = {
        "cache off": Engine.from_pretrained(args.model, device="cpu", feature_cache_mb=0),
        "cache on": Engine.from_pretrained(args.model, device="cpu"),
    }
    if engines["cache on"].feature_cache is None:
        raise SystemExit(f"{args.model}: no encoder has a frozen part; nothing to cache")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}, k = {args.shots} "
        f"({args.choose}{f' of {args.pool}' if args.choose == 'random' else ''}), {args.requests} requests"
    )
    prompts = requests(engines["cache on"], args)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    timed(engines["cache off"], prompts[:2], params)  # warm-up (not counted)
    first_s, _ = timed(engines["cache on"], prompts, params)  # the cache fills
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    answers: dict[str, list[list[int]]] = {}
    for r in range(args.repeats):
        for name in engines if r % 2 == 0 else reversed(list(engines)):
            s, answers[name] = timed(engines[name], prompts, params)
            seconds[name].append(s)
    base = statistics.fmean(seconds["cache off"])
    print("\n| engine | ms per request | vs cache off |\n|---|---:|---:|")
    print(f"| cache on, first pass (filling) | {1000 * first_s:.0f} | {base / first_s:.2f}x |")
    for name, values in seconds.items():
        mean = statistics.fmean(values)
        print(f"| {name} (mean of {len(values)}) | {1000 * mean:.0f} | {base / mean:.2f}x |")
    differ = sum(a != b for a, b in zip(answers["cache off"], answers["cache on"]))
    stats = engines["cache on"].feature_cache.stats
    print(f"\nanswers differing: {differ} of {len(prompts)}; cache {stats.as_dict()}")
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
