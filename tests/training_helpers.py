"""Helpers shared by the training tests (and the loader, packing and stream tests): the tiny training
config, random text records, and batch equality. The `gpt_processor` fixture is in conftest.py."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import torch

from metalm.data.records import TextDocument
from tests.conftest import TINY_MODEL


def tiny_config(output_dir: Path, **sections) -> dict:
    cfg = {
        "model": copy.deepcopy(TINY_MODEL),
        "data": {
            "streams": [
                {"name": "docs", "source": "pydoc", "weight": 2.0},
                {"name": "captions", "source": "easy_vqa_captions", "weight": 1.0},
            ],
            "seq_len": 48,
            "max_records": 40,
        },
        "optim": {"lr": 2e-3, "warmup_steps": 2, "max_steps": 6, "batch_size": 4, "grad_accum": 2},
        "run": {
            "output_dir": str(output_dir),
            "seed": 0,
            "log_every": 1,
            "eval_every": 3,
            "eval_batches": 2,
            "save_every": 2,
            "keep_checkpoints": 3,
            "tensorboard": False,
        },
    }
    for key, value in sections.items():
        cfg[key].update(value)
    return cfg


def text_records(n: int, seed: int = 0) -> list[TextDocument]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [
        TextDocument(" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))), id=str(i))
        for i in range(n)
    ]


def batches_equal(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for key, value in a.items():
        if isinstance(value, dict):
            if not batches_equal(value, b[key]):
                return False
        elif not torch.equal(value, b[key]):
            return False
    return True
