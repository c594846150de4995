"""Demonstrations chosen by similarity to the query (``metalm eval --demos similar``).

The paper (after GPT-3) draws each query's demonstrations at random, and so does ``metalm eval`` by default.
Retrieval instead gives each query the ``k`` pool examples most like it: RICES in Flamingo / OpenFlamingo
(Alayrac et al. 2022, Awadalla et al. 2023: nearest images under the vision encoder), KATE for GPT-3 (Liu
et al. 2022: nearest sentences under a sentence encoder). Here "like" is read by the model's own encoders:
an example's input (its image, audio and rendered text, as the task encodes them) goes through
:meth:`~metalm.model.modeling_metalm.MetaLMForCausalLM.embed_inputs`, the vectors each encoder places in the
decoder are averaged (a model without a text encoder: the decoder's token embeddings of the text), each
average is L2-normalised, and the cosine similarity of two examples is the mean over those parts. Text is
read by the text encoder in baseline mode too, so that a model is shown the same demonstrations as encoded
inputs and as plain text. The chosen
demonstrations are laid out least similar first, so the most similar one is next to the query (Liu et al.
2022 found that order best).

Retrieval is deterministic, so a task evaluated with it runs once per k whatever the seeds. Episode tasks
(fast binding) draw their own demonstrations and ignore it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from metalm.data.processor import MetaLMProcessor
from metalm.data.segments import to_device
from metalm.evaluation.protocol import Example, Task, TaskError

__all__ = ["DEMONSTRATION_CHOICES", "SIMILARITY", "ExampleIndex", "example_vectors"]

DEMONSTRATION_CHOICES = ("random", "similar")
# How a summary names retrieval (``summary["demonstrations"]``; None for the default random draw).
SIMILARITY = "the k most similar pool examples under the model's encoders, most similar last"

PartsOf = Callable[[Example], list[Any]]
# Queries compared with the whole pool at a time: easy-VQA's 9,673 test questions against its 34,774
# training ones would be a 1.3 GB similarity matrix at once.
QUERY_CHUNK = 256


@torch.no_grad()
def example_vectors(
    model, processor: MetaLMProcessor, examples: Sequence[Example], parts_of: PartsOf, *,
    batch_size: int = 64, desc: str = "retrieval", progress: bool = True,
) -> torch.Tensor:  # fmt: skip
    """One unit vector per example ([N, D], float32, on the CPU): per kind of decoder position (each
    encoder's slots, plain decoder text), the mean of the input embeddings there, L2-normalised, the parts
    concatenated and scaled so that a dot product is their mean cosine. `parts_of` gives an example's
    input parts as the task shows them (the decoder prompt too, which every example shares: it moves every
    similarity alike)."""
    from metalm.evaluation.icl import prompt_to_sample

    device = next(model.parameters()).device
    names = [spec["name"] for spec in model.config.encoders]
    out: list[torch.Tensor] = []
    bar = tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        samples = [prompt_to_sample(processor, parts_of(ex), add_bos=False) for ex in chunk]
        batch = to_device(processor.collate(samples), device)
        slots = {n: mask.bool() for n, mask in batch.get("encoder_slots", {}).items()}
        inputs = (batch["input_ids"], batch.get("encoder_inputs"), batch.get("encoder_slots"))
        embeds = model.embed_inputs(*inputs).float()
        real = batch["attention_mask"].bool()
        text = real & ~torch.stack([real.new_zeros(real.shape), *slots.values()]).any(0)
        kinds = [slots.get(n) for n in names] + [text]
        means = [_masked_unit_mean(embeds, mask) for mask in kinds]
        out.append(torch.cat(means, dim=-1).cpu())
        bar.update(len(chunk))
    bar.close()
    vectors = torch.cat(out)
    present = (vectors.view(len(examples), len(names) + 1, -1).norm(dim=-1) > 0).sum(-1).clamp(min=1)
    return vectors / present.sqrt().unsqueeze(-1)


def _masked_unit_mean(embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per row, the unit mean of ``embeds`` where ``mask`` is set; zeros where it is never set."""
    if mask is None:
        return embeds.new_zeros(embeds.shape[0], embeds.shape[-1])
    summed = (embeds * mask.unsqueeze(-1)).sum(1)
    return torch.nn.functional.normalize(summed, dim=-1)  # a zero sum stays zero


class ExampleIndex:
    """A task's demonstration pool and its vectors, computed once (on first use) for every k and seed."""

    def __init__(self, model, processor: MetaLMProcessor, task: Task, parts_of: PartsOf, **kw: Any) -> None:
        self.model, self.processor, self.task, self.parts_of, self.kw = model, processor, task, parts_of, kw
        self._pool: list[Example] | None = None
        self._vectors: torch.Tensor | None = None
        self._queries: Sequence[Example] | None = None
        self._query_vectors: torch.Tensor | None = None

    def vectors(self, examples: Sequence[Example], desc: str) -> torch.Tensor:
        return example_vectors(self.model, self.processor, examples, self.parts_of, desc=desc, **self.kw)

    def demonstrations(
        self, pool: list[Example], queries: Sequence[Example], k: int, *, exclude_self: bool
    ) -> list[list[Example]]:
        """For each query, the ``k`` pool examples most similar to it, least similar first; with
        ``exclude_self`` (the pool is the evaluated split) a query is never its own demonstration."""
        if k <= 0:
            return [[] for _ in queries]
        if self._pool is not pool:
            self._pool, self._vectors = pool, self.vectors(pool, f"{self.task.name} pool")
        assert self._vectors is not None
        if k > len(pool) - (1 if exclude_self else 0):
            raise TaskError(f"asked for {k} demonstrations but the pool holds only {len(pool)} examples")
        if self._queries is not queries:  # the same subset for every k: read once
            self._queries, self._query_vectors = queries, self.vectors(queries, f"{self.task.name} queries")
        assert self._query_vectors is not None
        excluded = {ex.id: i for i, ex in enumerate(pool)} if exclude_self else {}
        chosen: list[list[Example]] = []
        for start in range(0, len(queries), QUERY_CHUNK):  # [chunk, pool] at a time, not [queries, pool]
            sims = self._query_vectors[start : start + QUERY_CHUNK] @ self._vectors.T
            for row, query in enumerate(queries[start : start + QUERY_CHUNK]):
                if query.id in excluded:
                    sims[row, excluded[query.id]] = -float("inf")
            # Ties (identical inputs) go to the earlier pool example: a stable sort of the negated scores.
            order = torch.sort(-sims, dim=-1, stable=True).indices[:, :k]
            chosen += [[pool[int(i)] for i in reversed(row.tolist())] for row in order]
        return chosen
