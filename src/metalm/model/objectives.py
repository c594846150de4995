"""Which positions carry the language-model loss, and the speech objectives added to it.

``labelled_positions``: where a batch's loss is (the LM head runs on those positions only in training).
``transcript_loss`` and ``typed_twin_loss``: what a speech connector trains on beside the answer's loss;
`MetaLMForCausalLM.forward` adds them when a batch carries transcripts or typed twins
(`metalm.data.segments.collate`)."""

from __future__ import annotations

from typing import Any

import torch


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of the positions whose next token is labelled [B, T], those next tokens [targets]): position
    p predicts labels[:, p + 1], as the decoder's own causal loss shifts them."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    keep = shifted != -100
    return keep, shifted[keep]


def transcript_loss(
    model: Any, projected: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """`model`'s CTC loss of the slots of N payloads ([N, S, width], their mask [N, S]) against what each says
    (decoder token ids [N, L], `lengths` [N]; a payload with length 0 is left out): each slot is scored
    against the decoder's word embeddings (as a tied LM head scores a hidden state), the pad token is
    the blank (as in transformers' `Wav2Vec2ForCTC`). It trains a connector to put the words a clip
    says into the slots where it says them, as embeddings the decoder already reads.
    `zero_infinity`: a transcript longer than its slots allow contributes nothing."""
    keep = lengths > 0
    if not bool(keep.any()):
        return projected.sum() * 0.0
    embedding = model.decoder.get_input_embeddings()
    # Slots stand where scaled embeddings stand (Gemma multiplies by sqrt(width)).
    words = embedding.weight * getattr(embedding, "embed_scale", 1.0)
    logits = projected[keep].float() @ words.float().T  # [N', S, vocab]
    log_probs = logits.log_softmax(-1).transpose(0, 1)  # [S, N', vocab], as ctc_loss takes it
    return torch.nn.functional.ctc_loss(
        log_probs,
        ids[keep],
        mask[keep].sum(-1),
        lengths[keep],
        blank=int(model.config.text_config.pad_token_id or 0),
        zero_infinity=True,
    )


def typed_twin_loss(
    model: Any, hidden_states: tuple[torch.Tensor, ...], labels: torch.Tensor, twins: dict[str, Any]
) -> torch.Tensor:
    """How far this batch's decoder states where each answer is predicted (the position before a row's
    first label, in every layer of `model`) are from those the same model computes, without gradient, for
    each row's typed twin (`twins["batch"]`, rows `twins["rows"]`): the mean over layers of the squared distance
    relative to the twin's, times each row's weight (`twins["weights"]`), averaged. A spoken question's
    answer is then pulled toward how the decoder reads the same question typed (DiVA's cross-modal
    distillation, Held et al. 2024, on hidden states)."""
    batch = {k: v for k, v in twins["batch"].items() if k != "labels"}
    with torch.no_grad():
        embeds = model.embed_inputs(batch.pop("input_ids"), batch.pop("encoder_inputs", None),
                                    batch.pop("encoder_slots", None))  # fmt: skip
        teacher = model.decoder.base_model(inputs_embeds=embeds, output_hidden_states=True, **batch)
    rows = twins["rows"]
    mine, theirs = _answer_positions(labels)[rows], _answer_positions(twins["batch"]["labels"])
    losses = []
    for student, target in zip(hidden_states[1:], teacher.hidden_states[1:]):
        s = student[rows, mine].float()
        t = target[torch.arange(len(rows), device=target.device), theirs].float()
        losses.append((s - t).pow(2).mean(-1) / t.pow(2).mean(-1).clamp(min=1e-6))
    per_row = torch.stack(losses).mean(0)
    return (per_row * twins["weights"].to(per_row.device)).mean()


def _answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the first of the positions that predict a label (`labelled_positions`)."""
    return labelled_positions(labels)[0].to(torch.int8).argmax(-1)
