"""Packing (`collate(..., pack=N)`): several samples in one row, attention kept inside each sample, labels
never crossing samples, and the same per-sample losses and gradients as the padded batch."""

from __future__ import annotations

import pytest
import torch

from metalm import Encode, Target
from metalm.data.segments import IGNORE_INDEX, SampleError, pack_rows
from tests.conftest import TINY_LLAMA, build_tiny
from tests.test_model import GEMMA3, GPT2, image

PROMPTS = [
    [image(0), Encode("what shape is this"), Target("a red circle")],
    [Target("the cat sat on the mat and looked at the dog")],
    [image(1), Target("a blue square")],
    ["question:", Encode("is it green"), Target("no")],
    [Target("a dog")],
]


def _samples(processor):
    return [processor.build_sample(p, add_eos=True, index=i) for i, p in enumerate(PROMPTS)]


def _token_losses(model, batch) -> torch.Tensor:
    """Each labelled token's loss, in (row, position) order of its label."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")


def _per_sample(batch, values: torch.Tensor) -> list[list[float]]:
    """`values` (one per labelled position, row-major) split by the sample each label belongs to."""
    labels = batch["labels"][:, 1:]
    owner = batch.get("sequence_ids")
    owner = owner[:, 1:] if owner is not None else torch.zeros_like(labels)
    rows, cols = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
    out: dict[tuple[int, int], list[float]] = {}
    for k, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        out.setdefault((r, int(owner[r, c])), []).append(float(values[k]))
    return list(out.values())


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]
    assert pack_rows([8, 1, 1], 8) == [[0], [1, 2]]
    with pytest.raises(SampleError, match="exceed the pack length"):
        pack_rows([9], 8)


def test_packed_batch_layout(tiny):
    model, processor = tiny
    samples = _samples(processor)
    padded = processor.collate(samples)
    packed = processor.collate(samples, pack=24)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert packed["input_ids"].shape[1] <= 24
    # Every real position and every label is kept, and nothing else is added.
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((padded["labels"] != IGNORE_INDEX).sum())
    for name in padded["encoder_slots"]:
        assert int(packed["encoder_slots"][name].sum()) == int(padded["encoder_slots"][name].sum())
    # Position ids restart per sample; a sample's first position carries no label (labels never cross).
    seq, pos, labels = packed["sequence_ids"], packed["position_ids"], packed["labels"]
    starts = (seq >= 0) & (pos == 0)
    assert int(starts.sum()) == len(samples)
    assert (labels[starts] == IGNORE_INDEX).all()
    assert (seq[packed["attention_mask"] == 0] == -1).all()


@pytest.mark.parametrize("decoder", [TINY_LLAMA, GPT2, GEMMA3], ids=["llama", "gpt2", "gemma3"])
def test_packed_equals_padded_losses_and_gradients(decoder):
    model, processor = build_tiny(decoder=decoder)
    assert model.supports_packing()
    samples = _samples(processor)
    padded = processor.collate(samples)
    packed = processor.collate(samples, pack=40)
    assert packed["input_ids"].shape[0] < len(samples)

    def run(batch):
        model.zero_grad(set_to_none=True)
        losses = _token_losses(model, batch)
        losses.mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return losses.detach(), grads

    loss_padded, grads_padded = run(padded)
    loss_packed, grads_packed = run(packed)
    # Same per-sample token losses (samples are laid out in another order, so compare as sorted sets).
    key = lambda v: (len(v), v[0])  # noqa: E731
    for a, b in zip(
        sorted(_per_sample(padded, loss_padded), key=key), sorted(_per_sample(packed, loss_packed), key=key)
    ):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_packed.mean(), loss_padded.mean(), rtol=1e-5, atol=1e-6)
    assert grads_padded.keys() == grads_packed.keys()
    for name in grads_padded:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], rtol=1e-4, atol=1e-6, msg=name)


def test_model_loss_is_unchanged_by_packing(tiny):
    """The model's own loss (the decoder's shift, token mean, `num_items_in_batch`) on both layouts."""
    model, processor = tiny
    samples = _samples(processor)
    padded, packed = processor.collate(samples), processor.collate(samples, pack=40)
    targets = (padded["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == int(targets)
    with torch.no_grad():
        a = model(**padded, num_items_in_batch=targets).loss
        b = model(**packed, num_items_in_batch=targets).loss
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_attention_across_samples(tiny):
    """Changing one sample's tokens changes no other sample's logits in the same row."""
    model, processor = tiny
    samples = _samples(processor)
    batch = processor.collate(samples, pack=64)
    assert batch["input_ids"].shape[0] == 1
    seq = batch["sequence_ids"][0]
    victim = int(seq[0])  # the row's first sample: every later one could otherwise see it
    changed = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    text_positions = (seq == victim) & ~sum(s[0] for s in batch["encoder_slots"].values()).bool()
    changed["input_ids"][0, text_positions] = (changed["input_ids"][0, text_positions] + 7) % 1000 + 1000
    with torch.no_grad():
        before = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        after = model(**{k: v for k, v in changed.items() if k != "labels"}).logits[0]
    others = (seq >= 0) & (seq != victim)
    assert not torch.allclose(before[seq == victim], after[seq == victim])
    torch.testing.assert_close(before[others], after[others])


def test_padding_layouts_are_untouched(tiny):
    """Without `pack` nothing changes: no sequence_ids, left padding still allowed, packing refuses it."""
    _, processor = tiny
    samples = _samples(processor)
    for side in ("left", "right"):
        batch = processor.collate(samples, padding_side=side)
        assert "sequence_ids" not in batch
        assert batch["input_ids"].shape[0] == len(samples)
    with pytest.raises(ValueError, match="right-padded"):
        processor.collate(samples, padding_side="left", pack=64)


def _train_config(tmp_path, pack: bool, **data) -> dict:
    from tests.training_helpers import tiny_config

    cfg = tiny_config(
        tmp_path / f"pack{pack}",
        data={"mix": "sample", "pack": pack, **data},
        optim={"max_steps": 3, "grad_accum": 2, "warmup_steps": 0},
        run={"save_every": 0, "eval_every": 0, "eval_batches": 1, "log_every": 1},
    )
    # Dropout draws depend on the layout (an encoder's payloads come in another order when packed).
    for enc in cfg["model"]["encoders"]:
        enc["config"] = {**enc["config"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return cfg


def _train(tmp_path, pack: bool, **data):
    from metalm.training.config import config_from_dict
    from metalm.training.trainer import train

    return train(config_from_dict(_train_config(tmp_path, pack, **data)))


def test_packed_training_gives_the_padded_losses(tmp_path, tiny):
    """Three optimizer steps on mixed text/image micro-batches: packing changes the layout, not the run."""
    from metalm.training.config import config_from_dict
    from metalm.training.data import build_data

    # The run really packs: its micro-batches have fewer rows than samples.
    cfg = config_from_dict(_train_config(tmp_path, pack=True))
    stream, _ = build_data(cfg.data, tiny[1], batch_size=cfg.optim.batch_size, seed=0)
    batches = stream.take(4)
    assert sum(b["input_ids"].shape[0] for b in batches) < 4 * cfg.optim.batch_size
    padded = _train(tmp_path, pack=False)
    packed = _train(tmp_path, pack=True)
    assert sorted(packed.losses) == sorted(padded.losses) == [1, 2, 3]
    for step in padded.losses:
        assert packed.losses[step] == pytest.approx(padded.losses[step], rel=1e-4)


def test_packing_refused_for_a_decoder_that_would_mix_samples(tmp_path, monkeypatch):
    from metalm.model.modeling_metalm import MetaLMForCausalLM
    from metalm.training.config import ConfigError

    monkeypatch.setattr(MetaLMForCausalLM, "supports_packing", lambda self: False)
    with pytest.raises(ConfigError, match="data.pack: the decoder .* lets packed samples attend"):
        _train(tmp_path, pack=True)


def test_supports_packing_detects_a_decoder_that_ignores_position_ids(tiny):
    """The probe itself: a decoder that gets a full 2D mask (so no packed-row detection) mixes samples."""
    model, _ = tiny
    assert model.supports_packing()
    decoder_forward = model.decoder.forward

    def leaky(*args, **kwargs):
        embeds = kwargs["inputs_embeds"]
        kwargs["attention_mask"] = torch.ones(embeds.shape[:2], dtype=torch.long)
        return decoder_forward(*args, **kwargs)

    model.decoder.forward = leaky
    try:
        assert not model.supports_packing()
    finally:
        del model.decoder.forward
