"""Training throughput: MetaLM's semi-causal step against the plain HF decoder step, in one run.

Measures, in the same process (these machines are noisy; compare only within a run):
1. a matmul peak (fp32 or bf16, as the run's precision);
2. the decoder alone as a plain HF causal LM training step on B × T tokens;
3. the MetaLM step on the same B × T decoder positions (image slots + encoded spans + causal text),
   encoders included.
Both steps are the trainer's own `train_step` (forward, backward, AdamW step; no clipping).
FLOPs are counted exactly by torch's FlopCounterMode over one step (attention and the
encoders' convolutions included), not estimated from parameter counts.

    python benchmarks/train_throughput.py                      # quickstart model, CPU, fp32
    python benchmarks/train_throughput.py --bf16               # with bf16 autocast

The paper-size GPU step is `benchmarks/gpu_train.py`.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from metalm import MetaLMForCausalLM
from metalm.data.segments import EncodedSegment, TextSegment, collate, to_device
from metalm.data.semicausal import sample_spans, semicausal_sample
from metalm.training.step import train_step


def quickstart_model() -> MetaLMForCausalLM:
    """The quickstart's shapes (configs/quickstart.yaml) with the real packaged encoders."""
    from metalm import EncoderRecipe, ModelRecipe

    model, _ = ModelRecipe(
        decoder={
            "model_type": "llama",
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
        },
        tokenizer="packaged:minilm-l6",
        encoders=[
            EncoderRecipe("text", "text", source="packaged:minilm-l6", trainable_layers=2),
            EncoderRecipe(
                "vision",
                "vision",
                source="packaged:efficientnet-lite0",
                connector="mlp",
                image_size=64,
                trainable_layers=2,
            ),
        ],
        semi_causal={"span_min": 4, "span_max": 12, "span_fraction": 0.25},
    ).build()
    return model


def metalm_batch(model: MetaLMForCausalLM, batch: int, seq_len: int, image_size: int, seed: int = 0) -> dict:
    """Half the rows are text windows with semi-causal spans, half are image + encoded prefix + causal text,
    all exactly `seq_len` decoder positions wide (so both steps process the same B × T)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    sc = model.config.semi_causal
    n_img = model.config.num_slots("vision")
    samples = []
    for i in range(batch):
        ids = [rng.randrange(1000, 30000) for _ in range(seq_len)]
        if i % 2 == 0:
            spans = sample_spans([(0, seq_len)], sc["span_min"], sc["span_max"], sc["span_fraction"], rng)
            samples.append(semicausal_sample(ids, spans, "text", list))
        else:
            prefix = 8
            samples.append(
                [
                    TextSegment(ids[:1]),
                    EncodedSegment(
                        "vision", pixel_values=torch.randn(3, image_size, image_size, generator=g)
                    ),
                    EncodedSegment("text", input_ids=ids[1 : 1 + prefix], target_ids=ids[1 : 1 + prefix]),
                    TextSegment(ids[1 + prefix : seq_len - n_img]),
                ]
            )
    return collate(samples, model.config, pad_token_id=0)


def timed(fn, steps: int, sync) -> float:
    fn()
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t) / steps


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model, batch_size, seq_len, image_size = quickstart_model(), args.batch or 16, args.seq_len or 128, 64
    model.to(device).train()
    batch = to_device(metalm_batch(model, batch_size, seq_len, image_size), device)
    assert batch["input_ids"].shape == (batch_size, seq_len)
    plain = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": batch["input_ids"],
    }
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    accelerator = Accelerator(cpu=device == "cpu")
    autocast_dtype = torch.bfloat16 if args.bf16 else None

    def training_step(fn_model, inputs):
        """The trainer's own train_step on one fixed micro-batch (no clipping, as before)."""
        opt = torch.optim.AdamW([p for p in fn_model.parameters() if p.requires_grad], lr=1e-4)
        return lambda: train_step(fn_model, [inputs], opt, accelerator, autocast_dtype=autocast_dtype)

    # The baseline decoder trains all its weights, as it would alone; MetaLM trains what its config says.
    dec_run = training_step(model.decoder, plain)
    meta_run = training_step(model, batch)

    n = 4096 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = min(timed(lambda: a @ a, 3 if device == "cpu" else 20, sync) for _ in range(3))  # best of three
    peak = 2 * n**3 / t_mm

    # Over a whole step; the optimizer's elementwise updates add no counted FLOPs.
    f_dec, f_meta = count_flops(dec_run), count_flops(meta_run)
    # Interleave the two measurements so drift hits both alike.
    t_dec = t_meta = float("inf")
    for _ in range(3):
        t_dec = min(t_dec, timed(dec_run, args.steps, sync))
        t_meta = min(t_meta, timed(meta_run, args.steps, sync))
    tokens = batch_size * seq_len
    out = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "model": "quickstart",
        "precision": "bf16 autocast" if args.bf16 else "fp32",
        "batch": batch_size,
        "seq_len": seq_len,
        "matmul_peak_GFLOPs": round(peak / 1e9, 1),
        "decoder_step_s": round(t_dec, 4),
        "decoder_tokens_per_s": round(tokens / t_dec, 1),
        "decoder_GFLOPs": round(f_dec / t_dec / 1e9, 1),
        "decoder_frac_of_peak": round(f_dec / t_dec / peak, 3),
        "metalm_step_s": round(t_meta, 4),
        "metalm_tokens_per_s": round(tokens / t_meta, 1),
        "metalm_GFLOPs": round(f_meta / t_meta / 1e9, 1),
        "metalm_frac_of_peak": round(f_meta / t_meta / peak, 3),
        "metalm_flops_per_step_vs_decoder": round(f_meta / f_dec, 3),
        "ratio_metalm_vs_decoder_achieved_flops": round((f_meta / t_meta) / (f_dec / t_dec), 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
