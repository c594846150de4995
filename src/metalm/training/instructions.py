"""Instruction samples' token ids: one record under one template, fitted to the text encoder and the window.

A supervised record (``format: instruction``, VQA in any format, the rows of ``format: in_context``) becomes
``[BOS] [image] Enc(template) prompt label [EOS]`` with only ``label [EOS]`` trained; this module renders the
template and tokenises the three texts once per (record, template), and
:class:`metalm.training.samples.RecordSamples` turns them into parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metalm.data.layouts import PromptLayout
from metalm.modalities.text import TEXT
from metalm.training.config import check_template

__all__ = ["TARGET_DELIMITER", "InstructionIds", "render_instruction", "target_ids"]

# Between an instruction sample's decoder text and its label: evaluation scores " " + option the same way.
TARGET_DELIMITER = " "


def target_ids(processor: Any, answer: str) -> list[int]:
    """An answer as a trained label: after a space (evaluation scores " " + option the same way), then EOS."""
    eos = [processor.eos_token_id] if processor.eos_token_id is not None else []
    return processor.tokenize(TARGET_DELIMITER + answer) + eos


@dataclass
class InstructionIds:
    """A rendered record: the encoder input in decoder ids (`input`) and in the text encoder's (`input_enc`;
    None without one), the decoder prompt, the trained label, and whether the input was cut to fit."""

    input: list[int]
    input_enc: list[int] | None
    prompt: list[int]
    target: list[int]
    cut: bool


class InstructionError(ValueError):
    """A record that cannot be rendered; `field` names the record field at fault."""

    def __init__(self, reason: str, field: str) -> None:
        super().__init__(reason)
        self.field = field


def render_instruction(
    processor: Any,
    *,
    kind: str,
    template: str,
    prompt_text: str,
    fields: dict[str, str],
    target: str,
    budget: int,
    text_encoder: str | None,
) -> InstructionIds:
    """Token ids of one record under one template. `budget`: the decoder positions left for the input
    (the window less BOS, image slots, prompt and label: see `instruction_budget`). A classification text
    that does not fit is cut word by word (binary search) until the rendered input fits the text
    encoder's span limit and the budget; any other input that exceeds the encoder's limit raises
    :class:`InstructionError`."""
    field = "question" if kind == "vqa" else "text"
    reason = check_template(template, kind)  # a JSONL stream without `kind` meets kinds only here
    if reason:
        raise InstructionError(reason, field)
    prompt = processor.tokenize(prompt_text) if prompt_text.strip() else []
    label = target_ids(processor, target)
    budget -= len(prompt) + len(label)
    config = processor.config
    limit = TEXT.span_limit(config.encoder_spec(text_encoder)) if text_encoder else None

    def measure(text: str) -> tuple[list[int], list[int] | None, bool, bool]:
        """(decoder ids, encoder ids, within the encoder's limit, within the budget)."""
        dec = processor.tokenize(text) if text.strip() else []
        if limit is None:
            return dec, None, True, len(dec) <= budget
        enc = TEXT.to_encoder_ids(processor, text_encoder, dec) if dec else []
        slots_used = config.num_slots(text_encoder, len(enc)) if enc else 0
        return dec, enc, len(enc) <= limit, slots_used <= budget

    layout = PromptLayout(template=template)
    dec, enc, in_encoder, in_window = measure(layout.render(**fields))
    cut = False
    if kind == "classification" and not (in_encoder and in_window):
        words = fields["text"].split()

        def render(n: int) -> str:
            return layout.render(**{**fields, "text": " ".join(words[:n])})

        # A word is at least one token, so no more than the token budget of words can fit.
        lo, hi = 0, max(0, min(len(words), budget if limit is None else min(budget, limit)))
        while lo < hi:  # the most words that fit
            mid = (lo + hi + 1) // 2
            if all(measure(render(mid))[2:]):
                lo = mid
            else:
                hi = mid - 1
        dec, enc, in_encoder, in_window = measure(render(lo))
        cut = True
        if not (in_encoder and in_window):
            raise InstructionError(
                f"template {template!r} alone does not fit the text encoder or data.seq_len", field
            )
    elif not in_encoder:
        raise InstructionError(f"input longer than the text encoder takes ({limit} tokens)", field)
    if dec and enc is not None and not enc:
        raise InstructionError("input is empty in the text encoder's vocabulary", field)
    return InstructionIds(dec, enc, prompt, label, cut)
