"""Do demonstrations change what a docked decoder sees in the query's image? A probe of three attention masks.

With four demonstrations before it, a query's image slots are read by the decoder's layers in the context of
the demonstrations (causal attention reaches back over them), and so is the question after it. This probe asks
the same easy-VQA questions at k = 0 and k = K under three masks, applied to the prompt only (no retraining):

- ``causal``: what the model does (the evaluation's own prompts, the same demonstrations per seed);
- ``image-alone``: every image's slots attend only to the prompt's start (BOS) and to their own image, so an
  image is read as with no demonstrations but for its distance to the prompt's start (RoPE is relative);
- ``own-image``: as ``image-alone``, and every text position attends to its own example's image only, not to
  the other examples' images (Flamingo's per-image cross-attention, as a self-attention mask).

The score is the first answer token's accuracy: the likeliest next token after the prompt equals the gold
answer's first token (for easy-VQA's one-word answers that is the answer's start; the page's figures, from
generation, are not this). With no demonstrations the three masks are the same mask. Prints, per question type,
each mask's score and its change on the same questions from k = 0 and from the causal mask with a 95 % interval,
and writes the per-question rows as JSON (`--from-json` prints the table of saved rows again).

    python scripts/image_attention_probe.py --model runs/gemma-vl/final --per-type 300 --shots 4 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from metalm.evaluation.breakdown import paired_change

MASKS = ("causal", "image-alone", "own-image")


def attention_mask(real: torch.Tensor, image: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, 1, T, T] boolean (True = may attend) for left-padded rows: `real` marks real positions, `image`
    the image slots. An image block starts where an image slot follows a non-image position."""
    batch, length = real.shape
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & real[:, None, :]
    if kind != "causal":
        starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
        block = starts.long().cumsum(-1)  # 0 before the first image, then the current example's image
        same_block = block[:, :, None] == block[:, None, :]
        prompt_start = (block == 0)[:, None, :]
        image_rows = image[:, :, None] & (prompt_start | (image[:, None, :] & same_block))
        allowed = torch.where(image[:, :, None], allowed & image_rows, allowed)
        if kind == "own-image":
            text_rows = ~image[:, :, None] & (block[:, :, None] > 0)
            other_image = image[:, None, :] & ~same_block
            allowed = allowed & ~(text_rows & other_image)
    allowed = allowed | torch.eye(length, dtype=torch.bool)  # padding rows attend to themselves (no NaN)
    return allowed[:, None]


@torch.no_grad()
def first_token_predictions(model, processor, samples, kind: str) -> list[int]:
    batch = processor.collate(list(samples), padding_side="left")
    real = batch["attention_mask"].bool()
    image = batch["encoder_slots"]["vision"].bool()
    embeds = model.embed_inputs(batch["input_ids"], batch.get("encoder_inputs"), batch.get("encoder_slots"))
    mask = attention_mask(real, image, kind)
    if model.decoder.config._attn_implementation == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=embeds.dtype).masked_fill(~mask, torch.finfo(embeds.dtype).min)
    out = model.decoder(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=batch["position_ids"],
        logits_to_keep=1,
        use_cache=False,
    )
    return out.logits[:, -1].argmax(-1).tolist()


def run(model, processor, task, examples, pool, k: int, seed: int, kind: str, batch_size: int) -> list[dict]:
    """`examples`: (index in the evaluation's subset, example) pairs; the index draws the demonstrations, as
    `metalm eval --per-group` does for the same subset."""
    from metalm.evaluation.icl import build_prompt, encoder_fits, prompt_to_sample, sample_demonstrations

    fits = encoder_fits(processor)
    rows = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        samples = []
        for i, ex in chunk:
            demos = sample_demonstrations(pool, k, seed=seed, index=i, exclude_id=None)
            samples.append(prompt_to_sample(processor, build_prompt(task, ex, demos, fits=fits), index=i))
        for (_, ex), token in zip(chunk, first_token_predictions(model, processor, samples, kind)):
            gold = processor.tokenize(task.render_target(ex.answers[0]))[0]
            rows.append({"id": ex.id, "group": ex.group, "right": int(token == gold)})
    return rows


def per_question(results: dict[str, list[dict]], prefix: str) -> dict[str, tuple[str, float]]:
    """Question id -> (its type, its score averaged over the runs whose key starts with `prefix`)."""
    runs = [rows for key, rows in results.items() if key.startswith(prefix)]
    return {
        rows[0]["id"]: (rows[0]["group"], statistics.fmean(r["right"] for r in rows)) for rows in zip(*runs)
    }


def summary_lines(results: dict[str, list[dict]], shots: int) -> list[str]:
    """Per question type: the score at k = 0 and under each mask at k = `shots` (mean over seeds), and each
    mask's change on the same questions from k = 0 and from the causal mask, ± its 95 % interval."""
    scores = {"k = 0": per_question(results, "k0")}
    scores |= {f"k = {shots}, {kind}": per_question(results, f"k{shots}-{kind}-") for kind in MASKS}
    causal = scores[f"k = {shots}, causal"]
    lines = [
        "| question type | prompt | score | change from k = 0 | change from causal |",
        "|---|---|---:|---:|---:|",
    ]
    for qtype in sorted({group for group, _ in scores["k = 0"].values()}):
        for name, by_id in scores.items():
            ids = [i for i, (group, _) in by_id.items() if group == qtype]
            cells = [f"{100 * statistics.fmean(by_id[i][1] for i in ids):.1f}"]
            for base in (scores["k = 0"], causal):
                change = paired_change([base[i][1] for i in ids], [by_id[i][1] for i in ids])
                no_change = by_id is base or name == "k = 0"
                cells.append("–" if no_change else f"{change['mean']:+.1f} ± {change['ci95']:.1f}")
            lines.append(f"| {qtype} (n={len(ids)}) | {name} | {' | '.join(cells)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a saved model folder (or --from-json)")
    parser.add_argument("--from-json", help="print the table of an earlier run's rows instead")
    parser.add_argument("--per-type", type=int, default=300)
    parser.add_argument("--types", default="colour", help="comma-separated question types to ask")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None, help="JSON of every row (default: next to the model)")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print("\n".join(summary_lines(saved["rows"], saved["args"]["shots"])))
        return
    if not args.model:
        parser.error("give --model (or --from-json)")
    results = probe(args)
    print("\n".join(summary_lines(results, args.shots)))
    out = Path(args.out) if args.out else Path(args.model).parent / "image_attention_probe.json"
    out.write_text(json.dumps({"args": vars(args), "rows": results}, indent=1) + "\n")
    print(f"rows: {out}")


def probe(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every row of the probe: ``{"k0": rows, "k{shots}-{mask}-s{seed}": rows, ...}``."""
    from transformers import AutoModelForCausalLM

    import metalm
    from metalm.data.processor import MetaLMProcessor
    from metalm.evaluation.protocol import in_model_layout
    from metalm.evaluation.task_runs import subset_examples
    from metalm.evaluation.tasks import get_task

    metalm.register()
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    processor = MetaLMProcessor.from_pretrained(args.model)
    task = in_model_layout(get_task("easyvqa"), model.config)
    types = set(args.types.split(","))
    subset = subset_examples(task.examples(task.eval_split), None, args.per_type)
    examples = [(i, ex) for i, ex in enumerate(subset) if ex.group in types]
    pool = task.examples(task.demo_split)
    results = {"k0": run(model, processor, task, examples, pool, 0, 0, "causal", args.batch_size)}
    for kind in MASKS:
        for seed in (int(s) for s in args.seeds.split(",")):
            key = f"k{args.shots}-{kind}-s{seed}"
            results[key] = run(
                model, processor, task, examples, pool, args.shots, seed, kind, args.batch_size
            )
            print(key, f"{100 * statistics.fmean(r['right'] for r in results[key]):.1f}", flush=True)
    return results


if __name__ == "__main__":
    main()
