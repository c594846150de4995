"""Offline stand-ins for a pretrained decoder: a tiny random Gemma-3 config and a tiny byte-level BPE
(GPT-2-style) tokenizer trained here from a few sentences (no download)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import TINY_BERT, TINY_VIT

# Gemma-3's text architecture at toy size: its embedding module multiplies by sqrt(hidden_size) = 8.
TINY_GEMMA = {
    "model_type": "gemma3_text",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "max_position_embeddings": 256,
    "sliding_window": 16,
}

CORPUS = [
    "Hello world. The quick brown fox jumps over the lazy dog.",
    "A small red circle sits next to a blue square on a white background.",
    "What colour is the shape? answer: red. Is there a triangle? answer: no.",
    "The news today covers sport, business, politics and the weather in the world.",
    "Summarize this image: a green triangle. a yellow circle. a gray rectangle.",
]


def write_bpe_tokenizer(directory: Path, vocab_size: int = 600) -> Path:
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer and decoder) saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
    )
    fast.save_pretrained(directory)
    return directory


def gemma_recipe(tokenizer: str, decoder: dict | str | None = None, **kw):
    """A tiny MetaLM on the tiny Gemma: a BERT text encoder (WordPiece, its own vocabulary) with a linear
    connector and a ViT tower with an MLP connector, as the packaged preset docks MiniLM + EfficientNet."""
    from metalm import EncoderRecipe, ModelRecipe

    return ModelRecipe(
        decoder=decoder or TINY_GEMMA,
        tokenizer=tokenizer,
        encoders=[
            EncoderRecipe("text", "text", source="config", config=TINY_BERT, tokenizer="packaged:minilm-l6"),
            EncoderRecipe(
                "vision", "vision", source="config", config=TINY_VIT, image_size=32, connector="mlp"
            ),
        ],
        semi_causal={"span_min": 2, "span_max": 6},
        **kw,
    )
