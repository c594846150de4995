"""Runs inside the vLLM server process (its own venv, no metalm there): the one decoding rule of metalm's
engine that vLLM's sampling parameters cannot state.

metalm's engine never starts an answer with a WordPiece continuation piece ("##l"; `JobRunner.
begin_suppress`); vLLM's ``bad_words`` / ``logit_bias`` hold for every step, not the first one only. This
logits processor (``--logits-processors metalm_vllm_plugin:FirstTokenBan``) reads the banned ids from the
exported decoder folder (``metalm_vllm.json``, written by `metalm.serving.vllm_export`) and applies them to
the first token of requests that ask for it (``vllm_xargs: {"metalm_first_token_ban": 1}``).

This folder holds only this file, so that putting it on the vLLM process's ``PYTHONPATH`` imports nothing
else of metalm.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

REQUEST_FLAG = "metalm_first_token_ban"
SIDECAR = "metalm_vllm.json"


class FirstTokenBan(LogitsProcessor):
    """-inf on the banned ids for requests (that ask for it) with no output token yet."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        sidecar = Path(vllm_config.model_config.model) / SIDECAR
        ids = json.loads(sidecar.read_text())["first_token_ban"] if sidecar.is_file() else []
        self.banned = torch.tensor(ids, dtype=torch.long, device=device)
        self.outputs: dict[int, list[int]] = {}  # batch index -> the request's output ids (a live list)

    def is_argmax_invariant(self) -> bool:
        return False  # banning ids changes the greedy choice

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.outputs, batch_update, self._track)
        for index in [i for i, out in self.outputs.items() if out]:  # past the first token: done
            del self.outputs[index]

    def _track(self, params, _prompt_ids, output_ids: list[int]) -> list[int] | None:
        wants = bool((params.extra_args or {}).get(REQUEST_FLAG))
        return output_ids if wants and len(self.banned) and not output_ids else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, output_ids in self.outputs.items():
            if not output_ids:
                logits[index, self.banned] = float("-inf")
        return logits
