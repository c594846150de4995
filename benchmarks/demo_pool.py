"""A server's demonstrations (`metalm chat / serve --demos`): a request's cost with the pool's images held in
memory, cropped and resized as the vision encoder reads them (what `DemonstrationPool` does), against the
pool's files read and decoded on every request (what it did before, and still does past its byte budget).

Writes `--shots` demonstration images of `--image-size` pixels (a real photo, scikit-image's astronaut,
resized, as JPEG: what a user's own examples look like) and one query image, attaches a pool of them to an
engine loaded from `--model` both ways, and times, interleaved, one request: the prompt built and prepared
(`engine.prepare(engine.chat_parts(...))`), and that plus a greedy answer of `--new-tokens` tokens
(`engine.generate`). The two prompts are checked to be the same before timing.

    python benchmarks/demo_pool.py --model runs/quickstart/final
    python benchmarks/demo_pool.py --model runs/quickstart/final --image-size 256 --shots 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from metalm.serving import demonstrations as pool_module
from metalm.serving.demonstrations import attach_demonstrations
from metalm.serving.engine import Engine
from metalm.serving.request_types import ChatMessage, Demonstration, SamplingParams

QUESTION = "what shape is in the image?"


def write_images(folder: Path, size: int, n: int) -> list[str]:
    """`n` JPEG photos of `size` x `size` pixels (the astronaut, each rotated a little: distinct files)."""
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((size, size))
    paths = []
    for i in range(n):
        path = folder / f"demo-{i}.jpg"
        photo.rotate(3 * i).save(path, quality=90)
        paths.append(str(path))
    return paths


def one_request(engine: Engine, query: str, new_tokens: int | None):
    """Prepare one chat request after the pool (and, with `new_tokens`, answer it greedily)."""
    prompt = engine.prepare(engine.chat_parts([ChatMessage("user", QUESTION, [query])]))
    if new_tokens:
        engine.generate(prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
    return prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/quickstart/final")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=3)
    args = parser.parse_args()
    engine = Engine.from_pretrained(args.model, device="cpu")
    settings = {"files read per request": 0, "images held": pool_module.POOL_IMAGE_BYTES}
    out: dict = {"model": args.model, "image size": args.image_size, "shots": args.shots}
    try:
        with tempfile.TemporaryDirectory() as folder:
            *shown, query = write_images(Path(folder), args.image_size, args.shots + 1)
            demos = [Demonstration("astronaut", QUESTION, [path]) for path in shown]
            pools = {}
            for label, budget in settings.items():
                pool_module.POOL_IMAGE_BYTES = budget
                pools[label] = attach_demonstrations(engine, demos, args.shots, "first")
            pool_module.POOL_IMAGE_BYTES = settings["images held"]
            prompts = []
            for pool in pools.values():
                engine.demonstrations = pool
                prompts.append(repr(one_request(engine, query, None).sample))
            assert prompts[0] == prompts[1], "the two pools must give the same prompt"
            for what, tokens in (
                ("prepare ms", None),
                (f"prepare + {args.new_tokens} tokens ms", args.new_tokens),
            ):
                times: dict[str, list[float]] = {label: [] for label in settings}
                for i in range(args.repeats):
                    for label in settings if i % 2 else reversed(list(settings)):  # alternate the order
                        engine.demonstrations = pools[label]
                        start = time.perf_counter()
                        one_request(engine, query, tokens)
                        times[label].append(1000 * (time.perf_counter() - start))
                row = {label: round(statistics.median(t), 2) for label, t in times.items()}
                row["speed-up"] = round(row["files read per request"] / row["images held"], 2)
                out[what] = row
    finally:
        engine.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
