"""Continuous vs dynamic batching vs one-by-one generation, in one run on one model.

Chat requests (a user turn read by the text encoder, every third with an image). Two workloads:

**Burst** (default): R requests arrive at once, each for exactly ``--new-tokens`` tokens. Latency = the
burst's start to the request's last token (p50 / p95); throughput = generated tokens / wall time.

- ``sequential``: ``Engine.generate`` called for one request after the other (no batching worker);
- ``dyn<=B``: the dynamic batcher with ``max_batch_size=B`` (10 ms wait window, one ``generate`` call per
  collected batch, left padding, KV cache);
- ``cont<=B``: the continuous batcher with ``max_batch_size=B`` (requests join and leave the running batch
  between decode steps).

**Poisson arrivals** (``--rates``): at each rate (requests/s) R requests arrive with exponential gaps, each
asking for a token budget drawn uniformly from ``--min-new-tokens``..``--new-tokens``; the same arrival
times and budgets (seeded) for both batchers, at ``max_batch_size=B`` (the largest of ``--batch-sizes``).
Latency = arrival to the request's last token; throughput = generated tokens (and requests) / the time
from the first arrival to the last answer.

With ``--engine vllm`` a third engine joins on the same model: the decoder in vLLM (its own venv, ``make
vllm``; metalm builds the prompt embeddings, `metalm.serving.vllm_backend`), fed the same requests.
``--decoder packaged:gemma3-270m`` docks the packaged Gemma-3 270M decoder (``.[gemma]`` extra) instead of
the random llama; metalm's own engine then runs dynamic batching (Gemma's sliding-window cache cannot join
a running batch).

With ``--http`` the burst also goes through the OpenAI-compatible server (uvicorn on loopback, the
``openai`` client, one thread per request) with each batcher at the largest B.

    python benchmarks/serve_load.py                    # burst: 32 requests x 32 new tokens
    python benchmarks/serve_load.py --http --requests 16
    python benchmarks/serve_load.py --rates 2 4 8 16 --requests 48 --min-new-tokens 8 --new-tokens 64
    python benchmarks/serve_load.py --engine vllm --decoder packaged:gemma3-270m --rates 1 2 --requests 24
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time

import torch
from PIL import Image

from metalm import EncoderRecipe, ModelRecipe
from metalm.serving.engine import Engine
from metalm.serving.request_types import ChatMessage, SamplingParams

QUESTIONS = [
    "what is the capital of france",
    "summarize this image",
    "question: how many shapes are there? answer:",
    "tell me a short story about a cat who learns to fly over the mountains",
    "translate to german: good morning",
    "what colour is the circle",
    "is this sentence positive or negative: i loved every minute of it",
    "write a haiku about autumn leaves",
]


SHORT = {"dynamic": "dyn", "continuous": "cont", "vllm": "vllm"}  # row names: dyn<=16, cont<=16


def build_model(directory: str, hidden: int, layers: int, decoder: str | None = None) -> None:
    torch.manual_seed(0)
    model, processor = ModelRecipe(
        decoder=decoder or {
            "model_type": "llama", "hidden_size": hidden, "intermediate_size": hidden * 8 // 3 // 64 * 64 or 128,
            "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
            "num_key_value_heads": max(1, hidden // 128), "max_position_embeddings": 512,
        },
        tokenizer=None if decoder else "packaged:minilm-l6",
        encoders=[
            EncoderRecipe("text", "text", source="config", tokenizer="packaged:minilm-l6" if decoder else "decoder", config={
                "model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 256, "vocab_size": 30522, "max_position_embeddings": 128}),
            EncoderRecipe("vision", "vision", source="config", image_size=64, connector="mlp", config={
                "model_type": "vit", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 256, "image_size": 64, "patch_size": 16}),
        ],
    ).build()  # fmt: skip
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def requests(n: int) -> list[list[ChatMessage]]:
    out = []
    for i in range(n):
        images = [Image.new("RGB", (64, 64), ((37 * i) % 256, 120, 200))] if i % 3 == 1 else []
        out.append([ChatMessage("user", QUESTIONS[i % len(QUESTIONS)], images)])
    return out


def summarize(name: str, latencies: list[float], tokens: int, wall: float) -> dict:
    lat = sorted(latencies)
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    row = {"name": name, "p50": statistics.median(lat), "p95": p95, "tok_s": tokens / wall, "wall": wall}
    print(
        f"{name:<12} p50 {row['p50'] * 1000:8.0f} ms   p95 {row['p95'] * 1000:8.0f} ms   "
        f"{row['tok_s']:8.1f} tok/s   wall {wall:6.2f} s   tokens {tokens}",
        flush=True,
    )
    return row


def run_sequential(engine: Engine, prompts: list, params: SamplingParams) -> dict:
    start = time.perf_counter()
    latencies, tokens = [], 0
    for prompt in prompts:
        result = engine.generate(prompt, params)
        latencies.append(time.perf_counter() - start)
        tokens += result.completion_tokens
    return summarize("sequential", latencies, tokens, time.perf_counter() - start)


def run_batched(engine: Engine, prompts: list, params: SamplingParams, batch: int) -> dict:
    engine.scheduler.max_batch_size = batch
    engine.scheduler.max_pending = len(prompts) + 1
    first_batch = len(engine.runner.batch_sizes)
    start_mono = time.monotonic()
    start = time.perf_counter()
    jobs = [engine.submit(p, params) for p in prompts]
    results = [job.result(timeout=600) for job in jobs]
    wall = time.perf_counter() - start
    latencies = [job.finished - start_mono for job in jobs]
    sizes = engine.runner.batch_sizes[first_batch:]
    name = f"{SHORT[engine.batching]}<={batch}"
    row = summarize(name, latencies, sum(r.completion_tokens for r in results), wall)
    what = (
        "generate calls, mean rows per call"
        if engine.batching == "dynamic"
        else "joins, mean rows after a join"
    )
    if sizes:  # vLLM batches on its side: no sizes here
        print(f"{'':<12} {len(sizes)} {what} {statistics.mean(sizes):.1f}", flush=True)
    return row


def poisson_schedule(
    n: int, rate: float, min_tokens: int, max_tokens: int, seed: int
) -> list[tuple[float, int]]:
    """(arrival time in seconds from the start, token budget) for n requests arriving at `rate` per second."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append((t, rng.randint(min_tokens, max_tokens)))
        t += rng.expovariate(rate)
    return out


def run_poisson(engine: Engine, prompts: list, schedule: list[tuple[float, int]], batch: int) -> dict:
    """Submit `prompts` at the schedule's times from this thread; latency = arrival to last token."""
    engine.scheduler.max_batch_size = batch
    engine.scheduler.max_pending = len(prompts) + 1
    prepared = [engine.prepare(p) for p in prompts]  # tokenizing is the client's share, not the batcher's
    start = time.monotonic()
    jobs, arrivals = [], []
    for prompt, (at, tokens) in zip(prepared, schedule):
        time.sleep(max(0.0, start + at - time.monotonic()))
        arrivals.append(time.monotonic())
        jobs.append(engine.submit(prompt, SamplingParams(max_new_tokens=tokens, temperature=0.0)))
    results = [job.result(timeout=600) for job in jobs]
    end = max(job.finished for job in jobs)
    latencies = [job.finished - arrived for job, arrived in zip(jobs, arrivals)]
    row = summarize(f"{engine.batching}", latencies, sum(r.completion_tokens for r in results), end - start)
    row["req_s"] = len(jobs) / (end - start)
    return row


def run_http(engine: Engine, prompts: list, params: SamplingParams, batch: int) -> dict:
    import base64
    import io
    import socket

    import openai
    import uvicorn

    from metalm.serving.server import ServerSettings, create_app

    engine.scheduler.max_batch_size = batch
    app = create_app(engine, ServerSettings(model_name="bench", max_concurrent_requests=len(prompts) + 1))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="-", max_retries=0
    )

    def to_openai(msgs: list[ChatMessage]) -> list[dict]:
        content: list[dict] = [{"type": "text", "text": msgs[0].text}]
        for img in msgs[0].images:
            buf = io.BytesIO()
            img.save(buf, "PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            content.append({"type": "image_url", "image_url": {"url": url}})
        return [{"role": "user", "content": content}]

    bodies = [to_openai(p) for p in prompts]
    latencies: list[float] = [0.0] * len(bodies)
    tokens: list[int] = [0] * len(bodies)
    start = time.perf_counter()

    def one(i: int) -> None:
        r = client.chat.completions.create(
            model="bench", messages=bodies[i], max_tokens=params.max_new_tokens, temperature=0
        )
        latencies[i] = time.perf_counter() - start
        tokens[i] = r.usage.completion_tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    server.should_exit = True
    thread.join(10)
    return summarize(f"http {SHORT[engine.batching]}<={batch}", latencies, sum(tokens), wall)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument(
        "--new-tokens", type=int, default=32, help="burst: every request's; Poisson: the most"
    )
    parser.add_argument("--min-new-tokens", type=int, default=8, help="Poisson: the fewest")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--rates", type=float, nargs="*", default=[], help="Poisson arrival rates (requests/s)"
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="1 is steadier on shared cores")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="Poisson arrival times and token budgets")
    parser.add_argument("--http", action="store_true", help="also run the burst through the HTTP server")
    parser.add_argument("--engine", choices=["metalm", "vllm"], default="metalm", help="vllm: add vLLM")
    parser.add_argument("--decoder", default=None, help="e.g. packaged:gemma3-270m (default: random llama)")
    parser.add_argument("--vllm-threads", type=int, default=None, help="default: --threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        build_model(directory, args.hidden, args.layers, args.decoder)
        continuous = Engine.from_pretrained(directory, device=args.device, name="bench")
    dynamic = Engine(
        continuous.model, continuous.processor, device=args.device, name="bench", batching="dynamic"
    )
    # A decoder that cannot batch continuously (Gemma's sliding window) runs dynamic batching either way.
    engines = [dynamic, continuous] if continuous.batching == "continuous" else [continuous]
    if args.engine == "vllm":
        from metalm.serving.vllm_process import VLLMSettings

        settings = VLLMSettings(threads=args.vllm_threads or args.threads, max_num_seqs=max(args.batch_sizes))
        engines.append(
            Engine(continuous.model, continuous.processor, device=args.device, name="bench", vllm=settings)
        )
    prompts = requests(args.requests)
    n_params = sum(p.numel() for p in continuous.model.parameters())
    decoder = args.decoder or f"llama decoder {args.hidden} wide x {args.layers} layers"
    print(
        f"model: {decoder} ({n_params / 1e6:.1f}M params with encoders); "
        f"{args.requests} requests; torch threads {args.threads}; device {continuous.device}",
        flush=True,
    )
    for engine in engines:  # warm-up
        engine.generate(prompts[0], SamplingParams(max_new_tokens=4))
    if args.rates:
        run_rates(engines, prompts, args)
    else:
        run_burst(engines, prompts, args)
    for engine in engines:
        engine.close()


def run_burst(engines: list[Engine], prompts: list, args: argparse.Namespace) -> None:
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    print(f"burst: {len(prompts)} requests at once x {args.new_tokens} new tokens (greedy)", flush=True)
    rows = [run_sequential(engines[0], prompts, params)]
    for batch in args.batch_sizes:
        rows += [run_batched(engine, prompts, params, batch) for engine in engines]
    if args.http:
        rows += [run_http(engine, prompts, params, max(args.batch_sizes)) for engine in engines]
    base = rows[0]
    print("\nratios vs sequential (throughput up, latency down is better):")
    for row in rows[1:]:
        print(
            f"{row['name']:<12} throughput x{row['tok_s'] / base['tok_s']:.2f}   "
            f"p50 latency x{row['p50'] / base['p50']:.2f}   p95 latency x{row['p95'] / base['p95']:.2f}"
        )
    print("\ncontinuous vs dynamic at the same batch size:")
    by_name = {row["name"]: row for row in rows}
    for name, cont in by_name.items():
        dyn = by_name.get(name.replace("cont<=", "dyn<="))
        if "cont<=" in name and dyn is not None:  # the burst rows, and the HTTP ones
            print(
                f"{name:<12} throughput x{cont['tok_s'] / dyn['tok_s']:.2f}   p50 x{cont['p50'] / dyn['p50']:.2f}   "
                f"p95 x{cont['p95'] / dyn['p95']:.2f}"
            )


def run_rates(engines: list[Engine], prompts: list, args: argparse.Namespace) -> None:
    batch = max(args.batch_sizes)
    print(
        f"Poisson arrivals: {len(prompts)} requests per rate, token budgets {args.min_new_tokens}..{args.new_tokens} "
        f"(greedy), max_batch_size {batch}, seed {args.seed}",
        flush=True,
    )
    table = []
    for rate in args.rates:
        schedule = poisson_schedule(len(prompts), rate, args.min_new_tokens, args.new_tokens, args.seed)
        print(
            f"rate {rate:g} requests/s (offered {len(prompts) / max(schedule[-1][0], 1e-9):.1f})", flush=True
        )
        table.append((rate, [run_poisson(engine, prompts, schedule, batch) for engine in engines]))
    print("\n| rate (req/s) | batcher | tokens/s | requests/s | p50 latency | p95 latency |")
    print("|---|---|---|---|---|---|")
    for rate, rows in table:
        for row in rows:
            print(
                f"| {rate:g} | {row['name']} | {row['tok_s']:.1f} | {row['req_s']:.2f} | {row['p50'] * 1000:.0f} ms | "
                f"{row['p95'] * 1000:.0f} ms |"
            )
    for other in range(1, len(engines)):  # continuous / dynamic, then vllm / metalm's continuous
        base = other - 1  # the engine listed before it
        print(f"\n{table[0][1][other]['name']} / {table[0][1][base]['name']}:")
        for rate, rows in table:
            new, old = rows[other], rows[base]
            print(
                f"rate {rate:<6g} throughput x{new['tok_s'] / old['tok_s']:.2f}   p50 x{new['p50'] / old['p50']:.2f}   "
                f"p95 x{new['p95'] / old['p95']:.2f}"
            )


if __name__ == "__main__":
    main()
