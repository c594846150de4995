"""Prompt layouts: how a trained model expects each kind of request to be laid out.

A model answers well only in the layout it was trained on. VQA is trained as
``[image] Enc("question: Q") answer: A``: the question goes through the text encoder, ``answer:`` is decoder
text. Sending the whole question through the encoder, or chat labels the model never saw, gives captions
or repeated words instead of answers. So the trainer writes the layouts of its streams into the saved
model's config (``prompt_layouts``), and ``generate``, ``chat``, ``serve`` and ``eval`` read them from there.

A layout is an encoder-input ``template`` (with ``{question}`` / ``{text}`` / ``{options}`` placeholders; sent
through the text encoder, or as plain decoder text for a model without one) and a decoder ``prompt`` that
follows it. Images come first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from metalm.modalities import get_modality, modality_of_field

__all__ = [
    "CHAT_HISTORY",
    "CAPTION_INSTRUCTION",
    "DEFAULT_LAYOUTS",
    "PromptLayout",
    "PromptLayouts",
    "chat_layout_parts",
    "check_chat_history",
    "latest_request",
    "layouts_of",
]


def _part(record_field: str, value: Any, encoder: str | None = None) -> Any:
    """The processor part for `value`, a request's input under `record_field` ("image", "audio"), made by
    the plugin reading that field (this module imports none)."""
    return modality_of_field(record_field).part(value, encoder)


class PromptLayout(BaseModel):
    """One request kind's layout: `[images] Enc(template.format(fields)) prompt`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str = ""
    prompt: str = ""

    def render(self, **fields: str) -> str:
        """The encoder input for `fields` (what training encodes, and evaluation and chat send)."""
        return self.template.format_map(fields) if self.template else ""

    def parts(
        self,
        images: Iterable[Any] = (),
        *,
        text_encoder: str | None,
        vision_encoder: str | None = None,
        **fields: str,
    ) -> list[Any]:
        """Processor parts for one request. `text_encoder=None`: the input is plain decoder text."""
        parts: list[Any] = [_part("image", img, vision_encoder) for img in images]
        text = self.render(**fields)
        if text.strip():
            parts.append(get_modality("text").part(text, text_encoder) if text_encoder else text)
        if self.prompt.strip():
            parts.append(self.prompt)
        return parts


class PromptLayouts(BaseModel):
    """A model's layouts by request kind. `caption`: what an image alone becomes (default: nothing but the
    image, as image-text pairs are trained); `vqa`: a question, with or without images; `classification`:
    a text to label."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vqa: PromptLayout = PromptLayout(template="question: {question}", prompt="answer:")
    caption: PromptLayout = PromptLayout()
    classification: PromptLayout = PromptLayout(template="{text} OPTIONS: {options} TARGET:")


# The one place the default request layouts are written: training (`metalm.training.config`), the built-in
# evaluation tasks and chat/serve read them from here.
DEFAULT_LAYOUTS = PromptLayouts()
# The paper's zero-shot captioning request, and an instruction stream's default caption template.
CAPTION_INSTRUCTION = "Summarize this image:"


def layouts_of(config: Any) -> PromptLayouts:
    """The layouts saved in a model config (`prompt_layouts`), the defaults for what it does not name."""
    saved = getattr(config, "prompt_layouts", None) or {}
    return PromptLayouts.model_validate(saved)


CHAT_HISTORY = ("latest", "demonstrations")


def check_chat_history(history: str) -> str:
    """`history` when it is one of CHAT_HISTORY, else a ValueError naming them."""
    if history not in CHAT_HISTORY:
        raise ValueError(f"chat history must be one of {', '.join(CHAT_HISTORY)}, got {history!r}")
    return history


def latest_request(turns: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The conversation's last user turn alone; when it carries no image, the images of the latest user
    turn that did go with it (a follow-up question is about the picture still in view)."""
    last = dict(turns[-1])
    if not last.get("images"):
        earlier = (t.get("images") for t in reversed(turns[:-1]) if t.get("role") == "user")
        last["images"] = list(next((images for images in earlier if images), ()))
    return [last]


def chat_layout_parts(
    turns: Sequence[Mapping[str, Any]],
    layouts: PromptLayouts,
    *,
    text_encoder: str | None | Callable[[str], str | None],
    vision_encoder: str | None,
    history: str = "latest",
) -> list[Any]:
    """A conversation in the trained layouts. Each user turn is a request: with text it is a `vqa` request
    (its text the question), with images only a `caption` request. A turn is `{"role", "text", "images"}`
    and maybe `"audio"` (speech clips, heard right after the images): speech without text is transcribed,
    or with images is a spoken question (`[images] [speech] answer:`, as speech_easy_vqa trains).
    `text_encoder` may be a function of the rendered input (the encoder's name, or None to keep that input
    as decoder text).

    `history`: ``"latest"`` (default) answers the last user turn alone, in exactly the single-request layout
    every built-in stream trains (:func:`latest_request`); earlier answers in the prompt make a model that
    never trained on conversations copy them (the Gemma-docked preset answered a follow-up "what shape is
    it?" with the colour it had just given). ``"demonstrations"``: earlier turns stay, each assistant answer
    after its request closed by EOS (`None`), so the history reads as few-shot demonstrations, the way
    in-context learning is evaluated."""
    if check_chat_history(history) == "latest":
        turns = latest_request(turns)
    parts: list[Any] = []
    for turn in turns:
        text, images = (turn.get("text") or "").strip(), list(turn.get("images") or ())
        if turn["role"] == "assistant":
            parts += [text, None] if text else []
            continue
        clips = [_part("audio", clip) for clip in turn.get("audio") or ()]
        if clips and not text:
            parts += [_part("image", img, vision_encoder) for img in images] + clips
            parts += [layouts.vqa.prompt] if images and layouts.vqa.prompt.strip() else []
            continue
        layout = layouts.vqa if text else layouts.caption
        rendered = layout.render(question=text)
        encoder = text_encoder(rendered) if callable(text_encoder) else text_encoder
        request = layout.parts(images, text_encoder=encoder, vision_encoder=vision_encoder, question=text)
        parts += request[: len(images)] + clips + request[len(images) :]
    return parts
