"""Prompt building: requests (chat messages, a raw prompt, a question, images, speech) in the layouts the
model was trained on, then tokenized once into a `Prompt`.

Prompt layouts (chat)
---------------------
A model answers in the layouts it was trained on, which the trainer saves in its config
(``prompt_layouts``, :mod:`metalm.data.layouts`). A conversation becomes one request in them::

    [BOS] <enc(system)> <image>... <enc("question: " + user text)> answer:

- the last *user* turn is the request; when it has no image, the images of the latest user turn that had
  some go with it (a follow-up is about the picture still in view). Earlier turns are left out by default
  (``chat_history="latest"``): no built-in stream trains conversations, and a model shown its earlier
  answers copies them. ``chat_history="demonstrations"`` keeps them, each assistant answer closed by EOS
  after its request, as few-shot demonstrations (``... answer: red [EOS] <enc("question: ...")> answer:``);
- a user turn with text is a ``vqa`` request: its text fills the layout's encoder template (through the
  text encoder when the model has one and the rendered text fits ``processor.span_limit``; otherwise it is
  plain decoder text), followed by the layout's decoder prompt (``answer:``);
- a user turn with images only is a ``caption`` request (by default the images alone, as image-text pairs
  are trained);
- images of a turn come first in that turn, each through the vision encoder (``ImageInput``);
- system text, which no training stream has, is read as encoded context before the request.

One request (:meth:`PromptBuilder.request_parts`, ``metalm generate``)
-----------------------------------------------------------------------
A raw prompt (``--prompt``) is ``[BOS] <images...> <enc(prompt)>`` — the paper's zero-shot layout;
``--question`` uses the ``vqa`` layout and an image with neither uses the ``caption`` layout. Speech clips
are heard right after the images: alone they are transcribed, with images and no question they are a
spoken question (``[images] [clip] answer:``). Demonstrations (``--demos``) come first, each laid out as a
request of its own followed by its answer and EOS: the k-shot prompt of ``metalm eval``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

from PIL import Image

from metalm.data.images import ImageError, load_image
from metalm.data.layouts import chat_layout_parts, check_chat_history, layouts_of
from metalm.data.processor import InputError, MetaLMProcessor
from metalm.data.segments import Sample, TextSegment, sample_length
from metalm.modalities import encoders_of_field
from metalm.modalities.audio import AudioInput
from metalm.modalities.text import TEXT, Encode
from metalm.modalities.vision import ImageInput
from metalm.serving.request_types import ChatMessage, Demonstration, Prompt

__all__ = ["PromptBuilder"]


class PromptBuilder:
    """Builds the processor parts of a request in the model's trained layouts and tokenizes them.

    Args:
        processor: the model's `MetaLMProcessor`.
        config: the model's config (its encoders and saved layouts).
        encode_max_tokens: user text longer than this (in encoder tokens) goes to the decoder instead of the
            text encoder (default: the encoder's own span limit).
        chat_history: ``"latest"`` or ``"demonstrations"`` (module docstring).
    """

    def __init__(
        self,
        processor: MetaLMProcessor,
        config: Any,
        *,
        encode_max_tokens: int | None = None,
        chat_history: str = "latest",
    ) -> None:
        self.chat_history = check_chat_history(chat_history)
        self.processor = processor
        self.config = config
        self.encode_max_tokens = encode_max_tokens
        self.text_encoders: list[str] = config.encoders_of_kind("text")
        self.vision_encoders: list[str] = encoders_of_field(config, "image")
        self.layouts = layouts_of(config)  # the request layouts the model was trained on
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe to call from several threads

    # --- parts ----------------------------------------------------------------------------------------
    def _encodable(self, text: str, encode: bool | None) -> bool:
        if encode is False or not self.text_encoders:
            return False
        with self._tok_lock:
            return TEXT.fits_encoder(self.processor, self.text_encoders[0], text, self.encode_max_tokens)

    def _text_part(self, text: str, encode: bool | None) -> str | Encode:
        if self._encodable(text, encode):
            return Encode(text, encoder=self.text_encoders[0])
        return text

    def _vision_for(self, images: Sequence[Any]) -> str | None:
        """The vision encoder that reads `images` (None when there are none); an error if the model has none."""
        if not images:
            return self.vision_encoders[0] if self.vision_encoders else None
        if not self.vision_encoders:
            raise InputError("this model has no vision encoder, so it cannot read images")
        return self.vision_encoders[0]

    def _image_part(self, image: Any) -> ImageInput:
        return ImageInput(image, encoder=self._vision_for([image]))

    def text_parts(self, prompt: str, images: Iterable[Any] = (), *, encode: bool | None = None) -> list[Any]:
        """A raw prompt: images first, then the prompt text (encoded when it fits, unless ``encode=False``)."""
        parts: list[Any] = [self._image_part(img) for img in images]
        if prompt and prompt.strip():
            parts.append(self._text_part(prompt, encode))
        if not parts:
            raise InputError("empty prompt: give some text or an image")
        return parts

    def chat_parts(self, messages: Sequence[ChatMessage | dict], *, encode: bool | None = None) -> list[Any]:
        """A conversation in the layouts the model was trained on (module docstring) as a list of parts;
        `None` entries mark an EOS token."""
        msgs = [m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in messages]
        if not msgs:
            raise InputError("messages: at least one message is needed")
        turns: list[dict[str, Any]] = []
        context: list[str] = []
        for i, msg in enumerate(msgs):
            role = {"developer": "system"}.get(msg.role, msg.role)
            if role not in ("system", "user", "assistant"):
                raise InputError(
                    f"messages[{i}]: role {msg.role!r} is not supported (system, user, assistant)"
                )
            text = (msg.text or "").strip()
            if role == "system":
                if msg.images or msg.audio:
                    raise InputError(f"messages[{i}]: system messages cannot carry images or audio")
                context += [text] if text else []
                continue
            if role == "assistant" and (msg.images or msg.audio):
                raise InputError(f"messages[{i}]: assistant messages cannot carry images or audio")
            if role == "user" and not text and not msg.images and not msg.audio:
                raise InputError(f"messages[{i}]: empty user message")
            turns.append({"role": role, "text": text, "images": list(msg.images), "audio": list(msg.audio)})
        if not turns or turns[-1]["role"] != "user":
            raise InputError("messages: the last message must come from the user")
        parts: list[Any] = [self._text_part(" ".join(context), encode)] if context else []
        return parts + chat_layout_parts(
            turns,
            self.layouts,
            text_encoder=lambda text: self.text_encoders[0] if self._encodable(text, encode) else None,
            vision_encoder=self._vision_for([img for turn in turns for img in turn["images"]]),
            history=self.chat_history,
        )

    def layout_parts(
        self, kind: str, images: Iterable[Any] = (), *, encode: bool | None = None, **fields: str
    ) -> list[Any]:
        """One request in the model's trained layout `kind` (`vqa`, `caption`, `classification`)."""
        layout = getattr(self.layouts, kind, None)
        if layout is None:
            raise InputError(
                f"unknown layout {kind!r}; this model has {', '.join(type(self.layouts).model_fields)}"
            )
        rendered = layout.template.format_map(fields) if layout.template else ""
        encoder = self.text_encoders[0] if rendered.strip() and self._encodable(rendered, encode) else None
        images = list(images)
        parts = layout.parts(images, text_encoder=encoder, vision_encoder=self._vision_for(images), **fields)
        if not parts:
            raise InputError(f"empty {kind} request: give some text or an image")
        return parts

    def request_parts(
        self,
        *,
        prompt: str | None = None,
        question: str | None = None,
        text: str | None = None,
        images: Sequence[Any] = (),
        audio: Sequence[Any] = (),
        encode: bool | None = None,
        demonstrations: Sequence[Demonstration] = (),
    ) -> list[Any]:
        """One request (module docstring): a ``question`` in the ``vqa`` layout, a raw ``prompt``, or
        ``images`` alone in the ``caption`` layout; speech clips (``audio``) right after the images;
        decoder ``text`` last; ``demonstrations`` before it all, each a request with its answer and EOS.
        ``images`` are loaded here (paths, bytes, data URLs or PIL images). ``encode=True`` makes text the
        text encoder cannot read an error instead of decoder text."""
        loaded = [self.load_image(image) for image in images]
        parts = self._request_layout(
            prompt, question, text, loaded, [AudioInput(clip) for clip in audio], encode
        )
        if encode is True and not any(isinstance(p, Encode) for p in parts):
            raise InputError(
                "--encode-prompt: the prompt does not fit the text encoder (or the model has none)"
            )
        return self.demonstration_parts(demonstrations, encode=encode) + parts

    def demonstration_parts(
        self, demonstrations: Sequence[Demonstration], *, encode: bool | None = None
    ) -> list[Any]:
        """Solved examples, each a request of its own then its answer and EOS (None): what goes before a
        request shown demonstrations."""
        return [p for i, demo in enumerate(demonstrations) for p in self._solved(i, demo, encode)]

    def _solved(self, index: int, demo: Demonstration, encode: bool | None) -> list[Any]:
        """A demonstration: its request, then its answer as decoder text and EOS (None)."""
        answer = (demo.answer or "").strip()
        if not answer:
            raise InputError(f"demonstration {index}: it has no answer")
        if demo.question is None and not demo.images:
            raise InputError(f"demonstration {index}: give it a question or an image")
        images = [self.load_image(image) for image in demo.images]
        return [*self._layout_or_prompt(None, demo.question, images, encode), answer, None]

    def _request_layout(
        self,
        prompt: str | None,
        question: str | None,
        text: str | None,
        images: list[Any],
        clips: list[AudioInput],
        encode: bool | None,
    ) -> list[Any]:
        if question is not None and prompt is not None:
            raise InputError("give --question (the model's VQA layout) or --prompt (raw), not both")
        if clips and question is None and prompt is None:
            # Transcription (the clip alone), or a spoken question about the images: [images] [clip] answer:
            cue = text if text and text.strip() else ("answer:" if images else None)
            return (self.text_parts("", images) if images else []) + clips + ([cue] if cue else [])
        parts = self._layout_or_prompt(prompt, question, images, encode)
        parts[len(images) : len(images)] = clips  # heard right after the images, before the text
        return parts + ([text] if text and text.strip() else [])

    def _layout_or_prompt(
        self, prompt: str | None, question: str | None, images: list[Any], encode: bool | None
    ) -> list[Any]:
        if question is not None:
            return self.layout_parts("vqa", images, encode=encode, question=question)
        if prompt is not None:
            return self.text_parts(prompt, images, encode=encode)
        if images:
            return self.layout_parts("caption", images, encode=encode)
        raise InputError("nothing to generate from: give --question, --prompt, --image or --audio")

    # --- tokenizing -----------------------------------------------------------------------------------
    def prepare(self, prompt: Prompt | str | Sequence[Any]) -> Prompt:
        """Tokenize / preprocess a prompt once: a `Prompt`, a raw string, a list of `ChatMessage`s (or dicts),
        or a list of processor parts (`None` inserts an EOS token). Raises `InputError` on bad input."""
        if isinstance(prompt, Prompt):
            return prompt
        if isinstance(prompt, str):
            parts = self.text_parts(prompt)
        elif prompt and all(isinstance(m, ChatMessage | dict) for m in prompt):
            parts = self.chat_parts(prompt)
        else:
            parts = list(prompt)
        groups: list[list[Any]] = [[]]
        for part in parts:
            if part is None:
                groups.append([])
            else:
                groups[-1].append(part)
        sample: Sample = []
        with self._tok_lock:
            for k, group in enumerate(groups):
                if k > 0 and self.processor.eos_token_id is not None:
                    sample.append(TextSegment([self.processor.eos_token_id], loss=False))
                if group:
                    sample += self.processor.build_sample(group, add_bos=(k == 0))
        if not sample:
            raise InputError("empty prompt")
        return Prompt(sample, sample_length(sample, self.config))

    def fitted_image(self, source: Any) -> Image.Image:
        """`source` loaded (:meth:`load_image`), then cropped and resized as the vision encoder reads it
        (``ImagePreprocessor.fit``): a small copy a prompt of it prepares exactly as it prepares `source`."""
        image = self.load_image(source)
        return self.processor.preprocessors[self._vision_for([image])].fit(image)

    @staticmethod
    def load_image(source: Any, *, max_bytes: int = 20_000_000, max_pixels: int = 40_000_000) -> Image.Image:
        """`metalm.data.images.load_image` with explicit limits; raises `InputError`."""
        try:
            return load_image(source, max_bytes=max_bytes, max_pixels=max_pixels)
        except ImageError as err:
            raise InputError(str(err)) from err
