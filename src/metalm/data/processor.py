"""MetaLMProcessor: interleaved user input (decoder text and the parts of any encoder kind) → model inputs.

It owns the decoder tokenizer and one preprocessor per encoder (whatever its kind's plugin in
`metalm.modalities` uses), tokenizes decoder text, and collates with `metalm.data.segments.collate`.
Decoder text is its own; every other part is turned into a segment by the plugin that reads it, found
through the registry: this module names no kind and imports no plugin.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from metalm.data.segments import InputError, Sample, SampleError, TextSegment, collate
from metalm.data.tokenizer_check import check_tokenizer
from metalm.modalities import encoder_kinds, get_modality, modality_of_part
from metalm.model.configuration_metalm import MetaLMConfig

if TYPE_CHECKING:
    from metalm.modalities import Modality  # the interface, as the registry names it

__all__ = [
    "PROCESSOR_FILE",
    "InputError",
    "MetaLMProcessor",
    "Part",
    "Target",
    "Tokens",
    "continuation_pieces",
    "join_split_punctuation",
    "part_separator",
    "register_processor",
]

PROCESSOR_FILE = "metalm_processor.json"
# tokenize() remembers texts up to this many characters, this many of them (a few MB at most).
TOKEN_MEMO_CHARS = 256
TOKEN_MEMO_ENTRIES = 65_536


@dataclass
class Target:
    """Decoder text that carries the loss (an answer, a caption) when building training samples."""

    text: str


@dataclass
class Tokens:
    """Decoder text already tokenised (training caches its records' token ids): read as it is, with the loss
    on when `loss`."""

    ids: list[int]
    loss: bool = False


# Decoder text (`str`, `Target`, `Tokens`) or a part a registered plugin reads (its `part_types`: `Encode`,
# `ImageInput`, a PIL image, `AudioInput`, ...).
Part = Any


def part_type_names() -> list[str]:
    """The names of the part types the registered plugins read, in registry order."""
    return [t.__name__ for kind in encoder_kinds() for t in get_modality(kind).part_types]


def _part_error(err: InputError, index: int) -> InputError:
    """`err` marked with the index of the part it is about (`err.part`): a caller that made the parts
    knows what each came from (training names the record field)."""
    err.part = index
    return err


def part_separator(tokenizer: PreTrainedTokenizerBase) -> str:
    """What goes between two separately tokenised text parts so that they decode as two words.

    Measured, not looked up by tokenizer type: "Hello" and "world" are tokenised apart and decoded
    together. WordPiece (splits on whitespace and decodes word pieces with spaces) and SentencePiece with a
    dummy prefix (every piece run starts with "▁") already give "hello world": nothing is needed, and
    adding a space would change nothing for WordPiece but double it for a dummy prefix. Byte-level BPE
    (GPT-2) and SentencePiece without a dummy prefix (Gemma) give "Helloworld": the later part is
    tokenised with a leading space, which is how those tokenizers see a word inside running text."""
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("Hello", "world")]
    joined = tokenizer.decode(ids[0] + ids[1], skip_special_tokens=True)
    return "" if joined.strip().lower() == "hello world" else " "


_JOINS = (
    (re.compile(r"(?<=\w) ?([-/'’]) ?(?=\w)"), r"\1"),  # t - shirt, and / or, don ' t
    (re.compile(r"(?<=\d) ?([.,:]) ?(?=\d)"), r"\1"),  # 3. 5, 10 : 30, 1, 000
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),  # a space before closing punctuation
    (re.compile(r"([(\[{$]) "), r"\1"),  # a space after opening punctuation
)


def join_split_punctuation(text: str) -> str:
    """Undo the spaces a WordPiece decode puts around punctuation inside and after words."""
    for pattern, replacement in _JOINS:
        text = pattern.sub(replacement, text)
    return text


@functools.cache
def _continuation_pieces(tokenizer) -> tuple[int, ...]:
    prefix = getattr(
        getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None),
        "continuing_subword_prefix",
        None,
    )
    if not prefix:
        return ()
    return tuple(sorted(i for t, i in tokenizer.get_vocab().items() if t.startswith(prefix)))


def continuation_pieces(tokenizer) -> list[int]:
    """Ids of the vocabulary's word-continuation pieces (WordPiece ``##l``), or [] for a vocabulary that
    does not mark them (byte-BPE and SentencePiece mark word *starts*, and a text may open without one).
    A text that begins with a continuation piece decodes to "##l ...", which no person writes."""
    return list(_continuation_pieces(tokenizer))


class MetaLMProcessor:
    def __init__(
        self,
        config: MetaLMConfig,
        tokenizer: PreTrainedTokenizerBase,
        preprocessors: dict[str, Any] | None = None,
    ) -> None:
        """`preprocessors`: by encoder name (a tokenizer, an image preprocessor, ...); an encoder left out
        gets its kind's default, rebuilt from its spec (a vision encoder's normalisation), where it has one."""
        self.config = config
        self.tokenizer = tokenizer
        self.preprocessors = dict(preprocessors or {})
        for spec in config.encoders:
            if spec["name"] not in self.preprocessors:
                try:
                    self.preprocessors[spec["name"]] = get_modality(spec["kind"]).default_preprocessor(spec)
                except ValueError as err:
                    raise InputError(f"{spec['kind']} encoder {spec['name']!r} {err}") from err
        # Per-encoder facts a plugin works out once per processor, keyed by (encoder name, what): the text
        # plugin's "does this encoder share the decoder's vocabulary".
        self.plugin_memo: dict[tuple[str, str], Any] = {}
        self._token_memo: dict[str, tuple[int, ...]] = {}  # see tokenize()
        if self.pad_token_id is None:
            raise InputError("the decoder tokenizer needs a pad token (or an eos token to pad with)")
        self.part_separator = part_separator(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._wordpiece = type(getattr(backend, "decoder", None)).__name__ == "WordPiece"

    def preprocessors_of_kind(self, kind: str) -> dict[str, Any]:
        """The preprocessors of the encoders of `kind`, by encoder name."""
        return {name: self.preprocessors[name] for name in self.config.encoders_of_kind(kind)}

    def plugin_of(self, name: str) -> Modality:
        """The plugin of encoder `name`'s kind."""
        return get_modality(self.config.encoder_spec(name)["kind"])

    # --- tokens ----------------------------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int | None:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id

    @property
    def eos_token_id(self) -> int | None:
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id

    def tokenize(self, text: str) -> list[int]:
        """Decoder token ids of `text`, without special tokens (a new list each call). Short texts are
        remembered: training tokenises the same questions, prompts and answers thousands of times."""
        ids = self._token_memo.get(text)
        if ids is None:
            # verbose=False: the tokenizer's own max length is not the decoder's (collate checks that one).
            ids = tuple(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
            if len(text) <= TOKEN_MEMO_CHARS and len(self._token_memo) < TOKEN_MEMO_ENTRIES:
                self._token_memo[text] = ids
        return list(ids)

    def join_text(self, previous: str | None, text: str) -> str:
        """`text` as it is tokenised after the decoder text part `previous` (None: after the start, an
        image or an encoded span). Adjacent text parts are separate words: they get the tokenizer's
        `part_separator` between them unless the junction already has whitespace."""
        if previous is None or previous[-1:].isspace() or text[:1].isspace():
            return text
        return self.part_separator + text

    def encoder_for(self, kind: str, requested: str | None, where: str) -> str:
        """The encoder that reads a part of `kind`: the one it names, else the model's only one."""
        if requested is not None:
            spec = self.config.encoder_spec(requested)
            if spec["kind"] != kind:
                raise InputError(f"{where}: encoder {requested!r} is a {spec['kind']} encoder, not {kind}")
            return requested
        names = self.config.encoders_of_kind(kind)
        if len(names) != 1:
            raise InputError(f"{where}: the model has {len(names)} {kind} encoders {names}; name one")
        return names[0]

    # --- samples ---------------------------------------------------------------------------------------
    def build_sample(
        self,
        parts: list[Part],
        *,
        add_bos: bool = True,
        add_eos: bool = False,
        index: int = 0,
        caches: Mapping[str, Any] | None = None,
    ) -> Sample:
        """One sample from interleaved parts: `str` = decoder text (no loss), `Target` = decoder text with
        loss, `Tokens` = decoder text already tokenised, and any part a registered plugin reads
        (`metalm.modalities`: `Encode` = text for a text encoder, a PIL image or `ImageInput` for a vision
        encoder, `AudioInput` for an audio encoder). The one way a sample is built: serving's requests,
        evaluation's prompts and training's records (`metalm.training.samples`) all come here as parts.

        `caches`: by kind, what each plugin's `new_cache` made, handed to its `segment` (training keeps
        decoded images and log-mel features across epochs). A bad part raises `InputError` naming it, with
        its position in `parts` as the error's `part`."""
        if isinstance(parts, str | Target | Tokens) or modality_of_part(parts) is not None:
            parts = [parts]
        if not isinstance(parts, list | tuple) or not parts:
            raise InputError(f"sample {index}: expected a non-empty list of parts, got {parts!r:.80}")
        sample: Sample = []
        if add_bos and self.bos_token_id is not None:
            sample.append(TextSegment([self.bos_token_id], loss=False))
        previous: str | None = None  # the decoder text part just before this one, if any
        for j, part in enumerate(parts):
            where = f"sample {index}, part {j}"
            if isinstance(part, Tokens):
                sample.append(TextSegment(list(part.ids), loss=part.loss))
                previous = None
                continue
            if isinstance(part, str | Target):
                text = part if isinstance(part, str) else part.text
                if not text.strip():
                    raise _part_error(InputError(f"{where}: empty text"), j)
                ids = self.tokenize(self.join_text(previous, text))
                sample.append(TextSegment(ids, loss=isinstance(part, Target)))
                previous = text
                continue
            previous = None
            modality = modality_of_part(part)
            if modality is None:
                raise InputError(
                    f"{where}: unsupported part type {type(part).__name__}; use str, Target, Tokens or one of "
                    f"{', '.join(part_type_names())}"
                )
            cache = caches.get(modality.kind) if caches else None
            try:
                segment = modality.segment(
                    self, part, where, **({"cache": cache} if cache is not None else {})
                )
            except InputError as err:
                raise _part_error(err, j) from err.__cause__
            sample.append(segment)
        if add_eos and self.eos_token_id is not None:
            sample.append(TextSegment([self.eos_token_id], loss=True))
        return sample

    def collate(self, samples: list[Sample], *, padding_side: str = "right", **kwargs: Any) -> dict:
        try:
            return collate(
                samples, self.config, pad_token_id=self.pad_token_id, padding_side=padding_side, **kwargs
            )
        except SampleError as err:
            raise InputError(str(err)) from err

    def __call__(
        self,
        prompts: list[list[Part]] | list[Part],
        *,
        padding_side: str = "left",
        add_bos: bool = True,
        add_eos: bool = False,
        **kwargs: Any,
    ) -> dict:
        """Model inputs for one prompt (a list of parts) or a batch of prompts. Left padding by default, as
        generation needs; pass `padding_side="right"` for training."""
        if not isinstance(prompts, list | tuple):
            raise InputError(f"expected a list of parts or a list of prompts, got {type(prompts).__name__}")
        if prompts and not all(isinstance(p, list | tuple) for p in prompts):
            prompts = [prompts]
        samples = [
            self.build_sample(list(p), add_bos=add_bos, add_eos=add_eos, index=i)
            for i, p in enumerate(prompts)
        ]
        return self.collate(samples, padding_side=padding_side, **kwargs)

    def decode(self, ids, **kwargs: Any) -> str:
        """Text as a person would write it. A WordPiece tokenizer (BERT, MiniLM) splits punctuation off
        words and forgets the spacing, so its decode writes "t - shirt" and "3. 5"; that spacing is undone."""
        text = self.tokenizer.decode(
            ids, skip_special_tokens=kwargs.pop("skip_special_tokens", True), **kwargs
        )
        return join_split_punctuation(text) if self._wordpiece else text

    def batch_decode(self, ids, **kwargs: Any) -> list[str]:
        return [self.decode(row, **kwargs) for row in ids]

    # --- persistence -----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        # Both keys always, as earlier versions wrote the file; each plugin files its own encoders.
        meta: dict[str, Any] = {"encoder_tokenizers": [], "image_processors": {}}
        for spec in self.config.encoders:
            modality = get_modality(spec["kind"])
            modality.save_preprocessor(spec["name"], self.preprocessors[spec["name"]], directory, meta)
        (directory / PROCESSOR_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, config: MetaLMConfig | None = None, **hf_kwargs: Any
    ) -> MetaLMProcessor:
        """The processor saved in a model folder. `hf_kwargs`: what `AutoProcessor.from_pretrained` passes
        along (`_from_auto`, `trust_remote_code`, ...); a saved folder needs none of them."""
        directory = Path(directory)
        if config is None:
            config = MetaLMConfig.from_pretrained(directory)
        meta_path = directory / PROCESSOR_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: is {directory} a metalm checkpoint?")
        meta = json.loads(meta_path.read_text())
        tokenizer = AutoTokenizer.from_pretrained(directory)
        check_tokenizer(tokenizer, getattr(config.text_config, "vocab_size", None), directory)
        preprocessors = {}
        for spec in config.encoders:
            saved = get_modality(spec["kind"]).load_preprocessor(spec, directory, meta)
            if saved is not None:
                preprocessors[spec["name"]] = saved
        return cls(config, tokenizer, preprocessors)


def register_processor() -> None:
    """`AutoProcessor.from_pretrained(model_folder)` returns a MetaLMProcessor (idempotent)."""
    from transformers import AutoProcessor

    try:
        AutoProcessor.register(MetaLMConfig, MetaLMProcessor)
    except ValueError:
        pass


# As modeling_metalm: importing the processor registers it with AutoProcessor (see metalm/__init__.py).
register_processor()
