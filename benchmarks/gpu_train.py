"""Paper-size MetaLM training step on a GPU: tokens/s and MFU.

The `paper-vl` shape (docs/method.md): a GPT-2-medium-shaped decoder (24 layers, 1024 wide, 16 heads)
with a ViT vision tower of ~200M parameters (16 layers, 1024 wide, 224x224, patch 16 → 197 tokens) and a
BERT-base text encoder for the encoded text prefix, all from configs (random weights: speed does not depend
on them). Each sample: BOS, 197 image slots, an encoded text prefix, causal text. bf16 autocast, SDPA.

In the same run it measures a bf16 matmul peak and the plain decoder-only HF training step on the same number
of decoder positions, and prints the ratios. Both steps are the trainer's own `train_step`.

    python benchmarks/gpu_train.py                 # on a GPU
    python benchmarks/gpu_train.py --tiny          # smoke test on CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from accelerate import Accelerator

from metalm import MetaLMConfig, MetaLMForCausalLM
from metalm.data.segments import EncodedSegment, TextSegment, collate, to_device
from metalm.training.step import train_step


def sizes(tiny: bool) -> dict:
    if tiny:
        return dict(
            dec=dict(n_embd=64, n_layer=2, n_head=4),
            vis=dict(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                image_size=32,
                patch_size=16,
            ),
            txt=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
            batch=2,
            prefix=8,
            causal=24,
            image=32,
        )
    return dict(
        dec=dict(n_embd=1024, n_layer=24, n_head=16),
        vis=dict(
            hidden_size=1024,
            num_hidden_layers=16,
            num_attention_heads=16,
            intermediate_size=4096,
            image_size=224,
            patch_size=16,
        ),
        txt=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        batch=32,
        prefix=32,
        causal=223,
        image=224,
    )


def build(s: dict, attn: str) -> MetaLMForCausalLM:
    vocab = 30522
    config = MetaLMConfig(
        text_config={
            "model_type": "gpt2",
            "vocab_size": vocab,
            "n_positions": 1024,
            **s["dec"],
            "pad_token_id": 0,
            "bos_token_id": 101,
            "eos_token_id": 102,
        },
        encoders=[
            {
                "name": "vision",
                "kind": "vision",
                "config": {"model_type": "vit", **s["vis"]},
                "connector": "mlp",
                "image_size": s["image"],
                "num_slots": (s["image"] // 16) ** 2 + 1,
            },
            {
                "name": "text",
                "kind": "text",
                "config": {"model_type": "bert", "vocab_size": vocab, **s["txt"]},
                "connector": "linear",
                "prefix_ids": [101],
                "suffix_ids": [102],
            },
        ],
    )
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    return MetaLMForCausalLM(config)


def batch_for(model: MetaLMForCausalLM, s: dict, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(s["batch"]):
        ids = torch.randint(1000, 30000, (s["prefix"] + s["causal"],), generator=g).tolist()
        samples.append(
            [
                TextSegment([101]),
                EncodedSegment("vision", pixel_values=torch.randn(3, s["image"], s["image"], generator=g)),
                EncodedSegment("text", input_ids=ids[: s["prefix"]], target_ids=ids[: s["prefix"]]),
                TextSegment(ids[s["prefix"] :]),
            ]
        )
    return to_device(collate(samples, model.config, pad_token_id=0), device)


def params(module: torch.nn.Module, skip_embeddings: bool = False) -> int:
    return sum(
        p.numel()
        for n, p in module.named_parameters()
        if not (skip_embeddings and ("wte" in n or "word_embeddings" in n))
    )


def step_time(fn, steps: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--attn", default="sdpa")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtype = torch.bfloat16
    s = sizes(args.tiny)
    torch.manual_seed(0)
    model = build(s, args.attn).to(device).train()
    batch = batch_for(model, s, device)
    accelerator = Accelerator(cpu=device == "cpu")
    decoder = model.decoder
    T = batch["input_ids"].shape[1]
    plain = {
        "input_ids": batch["input_ids"],
        "labels": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
    }

    def training_step(fn_model, inputs):
        """The trainer's own train_step on one fixed micro-batch, bf16 autocast, no clipping."""
        opt = torch.optim.AdamW(fn_model.parameters(), lr=1e-4, fused=device == "cuda")
        return lambda: train_step(fn_model, [inputs], opt, accelerator, autocast_dtype=dtype)

    metalm_step = training_step(model, batch)
    decoder_step = training_step(decoder, plain)

    # Matmul peak measured here, in this run.
    n = 1024 if args.tiny else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    mm = step_time(lambda: a @ a, 5 if args.tiny else 20, sync)
    peak = 2 * n**3 / mm

    t_dec = step_time(decoder_step, args.steps, sync)
    t_meta = step_time(metalm_step, args.steps, sync)
    B = s["batch"]
    d, L = s["dec"]["n_embd"], s["dec"]["n_layer"]
    n_vis_tok = (s["image"] // 16) ** 2 + 1
    n_txt_tok = s["prefix"] + 2
    dec_flops = (
        6 * params(decoder, skip_embeddings=True) * B * T + 12 * L * d * T * T * B + 6 * d * 30522 * B * T
    )
    vis, txt = model.encoders["vision"], model.encoders["text"]
    vd, vL = s["vis"]["hidden_size"], s["vis"]["num_hidden_layers"]
    td, tL = s["txt"]["hidden_size"], s["txt"]["num_hidden_layers"]
    enc_flops = (
        6 * params(vis) * B * n_vis_tok
        + 12 * vL * vd * n_vis_tok**2 * B
        + 6 * params(txt, skip_embeddings=True) * B * n_txt_tok
        + 12 * tL * td * n_txt_tok**2 * B
        + 6 * params(model.connectors) * B * (n_vis_tok + s["prefix"])
    )
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "params_decoder_M": round(params(decoder) / 1e6, 1),
        "params_vision_M": round(params(vis) / 1e6, 1),
        "params_text_encoder_M": round(params(txt) / 1e6, 1),
        "batch": B,
        "decoder_positions": T,
        "matmul_peak_TFLOPs": round(peak / 1e12, 1),
        "decoder_only_step_s": round(t_dec, 4),
        "decoder_only_tokens_per_s": round(B * T / t_dec),
        "decoder_only_TFLOPs": round(dec_flops / t_dec / 1e12, 1),
        "metalm_step_s": round(t_meta, 4),
        "metalm_tokens_per_s": round(B * T / t_meta),
        "metalm_TFLOPs": round((dec_flops + enc_flops) / t_meta / 1e12, 1),
    }
    result["metalm_MFU_vs_measured_peak"] = round((dec_flops + enc_flops) / t_meta / peak, 3)
    result["metalm_MFU_vs_989_TFLOPs_spec"] = round((dec_flops + enc_flops) / t_meta / 989e12, 3)
    result["flops_ratio_metalm_vs_decoder"] = round(
        ((dec_flops + enc_flops) / t_meta) / (dec_flops / t_dec), 3
    )
    if device == "cuda":
        result["max_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
