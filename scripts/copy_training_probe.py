"""How long until a decoder learns to copy? Trains a saved model's decoder on nothing but repeated random
token sequences (loss on the repeat only, so copying from context is the only way down) and logs the repeat's
loss: where it leaves ln(vocab) is where induction heads form. A decoder that forms none within a budget
cannot learn fast binding (copying the name after the matching demonstration) within it either
(docs/results.md, fast binding). `--fresh` re-initialises the decoder first (same shape, random weights):
whether training made the decoder slower to learn copying than it would be from scratch. The model on disk is
not changed; `--save` writes the copy-trained model to a new folder (a start for `init_from`: does a decoder
that copies learn fast binding sooner? configs/ablations/quickstart-copy-first.yaml).

    python scripts/copy_training_probe.py --model runs/quickstart/final --steps 1500 --out copy-probe.json
    python scripts/copy_training_probe.py --model runs/quickstart/final --steps 300 --fresh
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from metalm.evaluation.copying import random_token_ids
from metalm.evaluation.experiments import load_model
from metalm.model.loading import write_manifest


def repeat_loss(decoder, pool: torch.Tensor, bos: int, batch: int, length: int, gen: torch.Generator):
    """Mean loss on the second showing of `batch` random sequences of 4..`length` tokens from `pool`."""
    n = int(torch.randint(4, length + 1, (), generator=gen))
    ids = pool[torch.randint(0, len(pool), (batch, n), generator=gen)]
    seq = torch.cat([torch.full((batch, 1), bos), ids, ids], 1)
    logits = decoder(input_ids=seq).logits[:, n:-1]  # the positions that predict the repeat
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a saved MetaLM folder")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--vocab", type=int, default=300, help="distinct tokens the sequences draw from")
    p.add_argument("--length", type=int, default=16, help="longest sequence (shown twice)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="re-initialise the decoder's weights first")
    p.add_argument("--out", type=Path, default=None, help="write the curve here (JSON)")
    p.add_argument("--save", type=Path, default=None, help="save the copy-trained model here (a new folder)")
    args = p.parse_args(argv)
    if args.save is not None and args.save.exists():
        p.error(f"--save {args.save}: already exists; name a new folder")
    torch.manual_seed(args.seed)
    model, processor = load_model(args.model)
    decoder = model.decoder.train()
    if args.fresh:  # transformers' own initialisation of this architecture, from its config
        decoder.load_state_dict(type(decoder)(decoder.config).state_dict())
    pool = torch.tensor(random_token_ids(processor, args.vocab, random.Random(args.seed)))
    bos = processor.bos_token_id if processor.bos_token_id is not None else int(pool[0])
    opt = torch.optim.AdamW(decoder.parameters(), lr=args.lr, weight_decay=0.01)
    gen, held_out = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    curve, start = [], time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), desc="copy training", unit="step")
    for step in bar:
        loss = repeat_loss(decoder, pool, bos, args.batch_size, args.length, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0:
            with torch.no_grad():
                val = repeat_loss(decoder.eval(), pool, bos, 64, args.length, held_out).item()
            decoder.train()
            curve.append({"step": step, "repeat_loss": val, "seconds": time.perf_counter() - start})
            bar.set_postfix(repeat_loss=f"{val:.2f}")
    result = {
        "model": str(args.model),
        "chance_loss": math.log(args.vocab),
        **{k: v for k, v in vars(args).items() if k not in ("model", "out", "save")},
        "curve": curve,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "curve"} | {"last": curve[-1:]}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.save:
        model.eval().save_pretrained(args.save)
        processor.save_pretrained(args.save)
        write_manifest(args.save, copy_training=curve[-1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
