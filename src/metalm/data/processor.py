"""MetaLMProcessor: interleaved user input (text, images, text marked to be encoded) → model inputs.

It owns the decoder tokenizer, one tokenizer per text encoder and one image preprocessor per vision
encoder, tokenizes each piece once, and collates with `metalm.data.segments.collate`.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from metalm.data.images import ImageError, ImagePreprocessor, load_image
from metalm.data.segments import EncodedSegment, Sample, SampleError, TextSegment, collate
from metalm.model.configuration_metalm import MetaLMConfig

PROCESSOR_FILE = "metalm_processor.json"


class InputError(ValueError):
    """Bad user input; the message names the sample and the part."""


@dataclass
class Encode:
    """Text to be read by a bidirectional encoder instead of the decoder. `encoder=None` picks the model's
    only text encoder. With `loss=True` (pre-training spans) its first token is a training target."""

    text: str
    encoder: str | None = None
    loss: bool = False


@dataclass
class Target:
    """Decoder text that carries the loss (an answer, a caption) when building training samples."""

    text: str


@dataclass
class ImageInput:
    """An image (path, bytes, data URL or PIL image) for a named vision encoder."""

    image: Any
    encoder: str | None = None


Part = str | Encode | Target | ImageInput | Image.Image


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
        encoder_tokenizers: dict[str, PreTrainedTokenizerBase] | None = None,
        image_processors: dict[str, ImagePreprocessor] | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.encoder_tokenizers = dict(encoder_tokenizers or {})
        self.image_processors = dict(image_processors or {})
        for spec in config.encoders:
            if spec["kind"] == "text" and spec["name"] not in self.encoder_tokenizers:
                raise InputError(f"text encoder {spec['name']!r} has no tokenizer")
            if spec["kind"] == "vision" and spec["name"] not in self.image_processors:
                from metalm.model.encoders import image_preprocessor_for

                self.image_processors[spec["name"]] = image_preprocessor_for(spec)
        # Same vocabulary → a decoder span is its own encoder input (the paper's setting); otherwise the
        # span is decoded and re-tokenized for the encoder.
        vocab = tokenizer.get_vocab()
        self._shared_vocab = {n: t.get_vocab() == vocab for n, t in self.encoder_tokenizers.items()}
        if self.pad_token_id is None:
            raise InputError("the decoder tokenizer needs a pad token (or an eos token to pad with)")
        self.part_separator = part_separator(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._wordpiece = type(getattr(backend, "decoder", None)).__name__ == "WordPiece"

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
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def join_text(self, previous: str | None, text: str) -> str:
        """`text` as it is tokenised after the decoder text part `previous` (None: after the start, an
        image or an encoded span). Adjacent text parts are separate words: they get the tokenizer's
        `part_separator` between them unless the junction already has whitespace."""
        if previous is None or previous[-1:].isspace() or text[:1].isspace():
            return text
        return self.part_separator + text

    def to_encoder_ids(self, name: str, decoder_ids: list[int]) -> list[int]:
        """A decoder-token span in encoder `name`'s vocabulary."""
        if self._shared_vocab[name]:
            return list(decoder_ids)
        text = self.tokenizer.decode(decoder_ids, skip_special_tokens=True)
        return self.encoder_tokenizers[name](text, add_special_tokens=False)["input_ids"]

    def span_limit(self, name: str) -> int:
        spec = self.config.encoder_spec(name)
        return spec["max_length"] - len(spec["prefix_ids"]) - len(spec["suffix_ids"])

    def _default_encoder(self, kind: str, requested: str | None, where: str) -> str:
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
        self, parts: list[Part], *, add_bos: bool = True, add_eos: bool = False, index: int = 0
    ) -> Sample:
        """One sample from interleaved parts: `str` = decoder text (no loss), `Target` = decoder text with
        loss, `Encode` = text for a text encoder, PIL image / `ImageInput` = an image for a vision encoder."""
        if isinstance(parts, str | Encode | Target | ImageInput | Image.Image):
            parts = [parts]
        if not isinstance(parts, list | tuple) or not parts:
            raise InputError(f"sample {index}: expected a non-empty list of parts, got {parts!r:.80}")
        sample: Sample = []
        if add_bos and self.bos_token_id is not None:
            sample.append(TextSegment([self.bos_token_id], loss=False))
        previous: str | None = None  # the decoder text part just before this one, if any
        for j, part in enumerate(parts):
            where = f"sample {index}, part {j}"
            if isinstance(part, str | Target):
                text = part if isinstance(part, str) else part.text
                if not text.strip():
                    raise InputError(f"{where}: empty text")
                ids = self.tokenize(self.join_text(previous, text))
                sample.append(TextSegment(ids, loss=isinstance(part, Target)))
                previous = text
                continue
            previous = None
            if isinstance(part, Encode):
                if not isinstance(part.text, str) or not part.text.strip():
                    raise InputError(f"{where}: empty text to encode")
                name = self._default_encoder("text", part.encoder, where)
                dec_ids = self.tokenize(part.text)
                enc_ids = (
                    dec_ids
                    if self._shared_vocab[name]
                    else self.encoder_tokenizers[name](part.text, add_special_tokens=False)["input_ids"]
                )
                if len(enc_ids) > self.span_limit(name):
                    raise InputError(
                        f"{where}: text to encode has {len(enc_ids)} tokens, more than encoder {name!r} "
                        f"takes ({self.span_limit(name)}); shorten it or split it into several Encode parts"
                    )
                sample.append(EncodedSegment(name, input_ids=enc_ids, target_ids=dec_ids, loss=part.loss))
            elif isinstance(part, ImageInput | Image.Image):
                image, requested = (
                    (part.image, part.encoder) if isinstance(part, ImageInput) else (part, None)
                )
                name = self._default_encoder("vision", requested, where)
                try:
                    pil = load_image(image, name=where)
                except ImageError as err:
                    raise InputError(str(err)) from err
                sample.append(EncodedSegment(name, pixel_values=self.image_processors[name]([pil])[0]))
            else:
                raise InputError(
                    f"{where}: unsupported part type {type(part).__name__}; use str, Encode, Target, "
                    "ImageInput or a PIL image"
                )
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
        for name, tok in self.encoder_tokenizers.items():
            tok.save_pretrained(directory / "encoders" / name)
        meta = {
            "encoder_tokenizers": sorted(self.encoder_tokenizers),
            "image_processors": {n: p.to_dict() for n, p in self.image_processors.items()},
        }
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
        encoder_tokenizers = {
            name: AutoTokenizer.from_pretrained(directory / "encoders" / name)
            for name in meta["encoder_tokenizers"]
        }
        image_processors = {n: ImagePreprocessor.from_dict(d) for n, d in meta["image_processors"].items()}
        return cls(config, tokenizer, encoder_tokenizers, image_processors)


def register_processor() -> None:
    """`AutoProcessor.from_pretrained(model_folder)` returns a MetaLMProcessor (idempotent)."""
    from transformers import AutoProcessor

    try:
        AutoProcessor.register(MetaLMConfig, MetaLMProcessor)
    except ValueError:
        pass
