"""lm-evaluation-harness model ``metalm``: run any lm-eval task on a saved MetaLM.

lm-eval (0.4.x) finds models only in its own registry; it has no entry-point discovery for external
models, and ``--include_path`` adds tasks only. Importing this module registers ``metalm``, so either

* run the harness through this module (same arguments as ``lm_eval``)::

      python -m metalm.evaluation.lm_eval_adapter --model metalm \\
          --model_args pretrained=DIR,encode_context=true --tasks TASK [--include_path DIR] --limit 10

* or, in Python, ``import metalm.evaluation.lm_eval_adapter`` before ``lm_eval.simple_evaluate(model="metalm",
  model_args={"pretrained": DIR}, ...)`` -- or pass ``MetaLMHarnessLM(model=..., processor=...)`` directly.

Model args: ``pretrained`` (a folder from ``save_pretrained``), ``encode_context`` (default false: the
context is decoder text, as for any causal LM; true: the context goes through the text encoder -- cut at
word boundaries into as many encoded spans as the encoder's limit needs -- and the continuation is decoder
text, the MetaLM way), ``batch_size``, ``device``, ``dtype`` (float32 / bfloat16 / float16),
``max_length`` (default: the decoder's position limit), ``max_gen_toks`` (default 256).

``loglikelihood_rolling`` (perplexity) always scores the whole document in the decoder: there is no
context to encode.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (fill lm-eval's own aliases first: get_model skips it once we register)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from metalm.data.processor import MetaLMProcessor
from metalm.data.segments import Sample, TextSegment, sample_length
from metalm.evaluation.icl import has_text_encoder, split_for_encoder
from metalm.evaluation.runner import decoder_context_length, generate_samples
from metalm.evaluation.scoring import score_continuations
from metalm.modalities.text import Encode

__all__ = ["MetaLMHarnessLM", "main"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _segment_key(segment: Any) -> tuple[Any, ...]:
    """What makes two context segments the same (a payload compared by value, never by a summary)."""
    if isinstance(segment, TextSegment):
        return ("text", tuple(segment.ids), segment.loss)

    def plain(value: Any) -> Any:  # tensors by their values: a tensor's repr elides the middle of it
        if isinstance(value, torch.Tensor):
            return value.tolist()
        if isinstance(value, dict):
            return sorted((k, plain(v)) for k, v in value.items())
        return [plain(v) for v in value] if isinstance(value, list | tuple) else value

    return ("encoded", segment.encoder, segment.payload_name, repr(plain(segment.payload)), segment.loss)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return bool(value)


@register_model("metalm")
class MetaLMHarnessLM(LM):
    """A MetaLM as an lm-eval ``LM`` (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``)."""

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: torch.nn.Module | None = None,
        processor: MetaLMProcessor | None = None,
        encode_context: bool | str = False,
        batch_size: int | str | None = 8,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        ignored = {k: v for k, v in kwargs.items() if v is not None}
        if ignored:
            logger.warning("metalm: ignoring model args %s", sorted(ignored))
        if model is None:
            if pretrained is None:
                raise ValueError("metalm needs model_args pretrained=DIR (a saved MetaLM folder)")
            from transformers import AutoModelForCausalLM

            import metalm

            metalm.register()  # the Auto classes (idempotent)

            torch_dtype = _DTYPES.get(str(dtype)) if dtype not in (None, "auto") else None
            if dtype not in (None, "auto") and torch_dtype is None:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or auto, got {dtype!r}")
            model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch_dtype)
            processor = MetaLMProcessor.from_pretrained(pretrained)
        elif processor is None:
            raise ValueError("pass processor= together with model=")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and not torch.cuda.is_available():
            # lm_eval's CLI passes device=cuda by default; on a CPU-only machine fall back quietly.
            logger.warning("metalm: CUDA is not available, running on cpu")
            dev = torch.device("cpu")
        self.model = model.to(dev).eval()
        self.processor = processor
        self._device = dev
        self.pretrained = pretrained or getattr(model.config, "_name_or_path", "") or "metalm"
        self.encode_context = _as_bool(encode_context)
        if self.encode_context and not has_text_encoder(model):
            raise ValueError("encode_context=true needs a model with a text encoder")
        try:  # lm-eval passes "auto" / "auto:N" for automatic sizing; we use a fixed size then
            self.batch_size = max(1, int(batch_size)) if batch_size is not None else 8
        except (TypeError, ValueError):
            logger.warning("metalm: batch_size=%r not supported, using 8", batch_size)
            self.batch_size = 8
        limit = decoder_context_length(model)
        self.max_length = int(max_length) if max_length is not None else (limit or 2048)
        self.max_gen_toks = int(max_gen_toks)
        prefix = processor.bos_token_id if processor.bos_token_id is not None else processor.eos_token_id
        if prefix is None:
            raise ValueError(
                "the decoder tokenizer has neither a BOS nor an EOS token to start sequences with"
            )
        self.prefix_token_id = prefix

    @property
    def tokenizer_name(self) -> str:
        return str(self.pretrained).replace("/", "__")

    # --- prompt building ----------------------------------------------------------------------------
    def _context(self, context: str, reserve: int) -> Sample:
        """BOS + the context (decoder tokens, or encoded spans), cut from the left so that ``reserve``
        more positions still fit in ``max_length``."""
        budget = self.max_length - 1 - reserve
        if budget < 0:
            raise ValueError(f"continuation of {reserve} tokens does not fit max_length {self.max_length}")
        head = [TextSegment([self.prefix_token_id], loss=False)]
        if self.encode_context and context.strip():
            chunks = split_for_encoder(self.processor, context)
            segs = self.processor.build_sample([Encode(c) for c in chunks], add_bos=False)
            # Drop whole spans from the left until the rest fits (lm-eval truncates contexts on the left).
            while segs and sample_length(segs, self.model.config) > budget:
                segs = segs[1:]
            return head + segs
        ids = self.processor.tokenize(context) if context else []
        ids = ids[len(ids) - budget :] if len(ids) > budget else ids
        return head + ([TextSegment(ids, loss=False)] if ids else [])

    def _loglikelihood_sample(self, context: str, continuation: str) -> Sample:
        # Trailing context whitespace belongs to the continuation (lm-eval's convention).
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        if self.encode_context and context.strip():
            cont = self.processor.tokenize(continuation)
        else:
            # Tokenize the whole string so that merges across the boundary match a plain causal LM.
            whole = self.processor.tokenize(context + continuation)
            ctx = self.processor.tokenize(context) if context else []
            cont = whole[len(ctx) :]
        if not cont:
            raise ValueError(f"continuation {continuation!r} has no tokens")
        cont = cont[-(self.max_length - 1) :]
        return [*self._context(context, len(cont)), TextSegment(cont, loss=True)]

    # --- lm-eval API ---------------------------------------------------------------------------------
    def _score(self, samples: list[Sample], desc: str, disable_tqdm: bool) -> list[tuple[float, int, bool]]:
        """Each sample's scored tail (its last, labelled segment) after the rest: samples with the same rest
        (a multiple-choice question's options) share one run of it (``score_continuations``), longest first,
        ``batch_size`` contexts per call."""
        groups: dict[tuple[Any, ...], tuple[Sample, list[int]]] = {}
        for i, sample in enumerate(samples):
            groups.setdefault(tuple(map(_segment_key, sample[:-1])), (sample[:-1], []))[1].append(i)
        order = sorted(groups.values(), key=lambda g: -sample_length(g[0], self.model.config))
        results: list[tuple[float, int, bool] | None] = [None] * len(samples)
        bar = tqdm(total=len(samples), desc=desc, disable=disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            tails = [[list(samples[i][-1].ids) for i in members] for _, members in chunk]
            scored = score_continuations(self.model, self.processor, [context for context, _ in chunk], tails)
            for (_, members), rows in zip(chunk, scored):
                for i, r in zip(members, rows):
                    results[i] = r
                bar.update(len(members))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        samples = [self._loglikelihood_sample(*req.args) for req in requests]
        out = []
        for req, (logprob, _, greedy) in zip(
            requests, self._score(samples, "metalm loglikelihood", disable_tqdm)
        ):
            out.append((logprob, greedy))
            self.cache_hook.add_partial("loglikelihood", req.args, (logprob, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        samples: list[Sample] = []
        owner: list[int] = []
        for r, req in enumerate(requests):
            (text,) = req.args[:1]
            tokens = self.processor.tokenize(text)
            # The input is context + predictions, so windows of max_length - 1 predictions fit exactly.
            windows = get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length - 1, 1)
            for ctx, pred in map(make_disjoint_window, windows):
                samples.append([TextSegment(list(ctx), loss=False), TextSegment(list(pred), loss=True)])
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _, _) in zip(owner, self._score(samples, "metalm rolling", disable_tqdm)):
            totals[r] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="metalm generate_until", disable=disable_tqdm)
        for key, idx in groups.items():
            gen = dict(json.loads(key))
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen.pop("max_gen_toks", self.max_gen_toks))
            kwargs: dict[str, Any] = {}
            do_sample = _as_bool(gen.pop("do_sample", False))
            temperature = float(gen.pop("temperature", 0.0) or 0.0)
            if do_sample and temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature)
                for name in ("top_p", "top_k"):
                    if name in gen:
                        kwargs[name] = gen.pop(name)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                samples = [self._context(requests[i].args[0], max_new) for i in chunk]
                texts = generate_samples(
                    self.model,
                    self.processor,
                    samples,
                    max_new_tokens=max_new,
                    stop=until,
                    strip=False,
                    **kwargs,
                )
                for i, text in zip(chunk, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> None:
    """``lm_eval`` with the ``metalm`` model registered (same command-line arguments)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
