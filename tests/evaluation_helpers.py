"""Helpers shared by the evaluation tests (and the demonstration tests): a solid-colour image file, a toy
sentiment task, and a rigged copy of a model whose logits plant an answer. The `one_thread` fixture is in
conftest.py."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metalm.evaluation.tasks import Example, Task


def image_file(tmp: Path, name: str, color: tuple[int, int, int]) -> str:
    path = tmp / name
    Image.fromarray(np.full((32, 32, 3), color, dtype=np.uint8)).save(path)
    return str(path)


def sentiment_task(examples: list[Example], **kw) -> Task:
    by_split = {"train": examples, "test": examples}
    return Task(
        name=kw.pop("name", "toy"),
        load=lambda split: by_split[split],
        input_template="{text} A:",
        options=("positive", "negative"),
        **kw,
    )


def rigged_model(model, processor, boosts: dict[str, float]):
    """A copy whose logits are the same at every position: zero lm_head weights plus a bias that boosts
    the given (single-token) words."""
    rigged = copy.deepcopy(model)
    head = torch.nn.Linear(
        model.config.text_config.hidden_size, model.config.text_config.vocab_size, bias=True
    )
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    for word, value in boosts.items():
        (tok,) = processor.tokenize(word)
        head.bias.data[tok] = value
    rigged.decoder.lm_head = head
    return rigged.eval()
