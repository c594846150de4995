"""Shared fixtures: tiny random MetaLMs built from configs (no download)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Shared helper modules with asserts of their own: rewritten like the tests, so a failure shows its values.
pytest.register_assert_rewrite("tests.serving_helpers")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is as fast and immune to oversubscription when the machine is busy.
torch.set_num_threads(1)

# `run.mixed_precision: auto` (the default) times bf16 against fp32 on a CPU with native bf16, and that timing
# swings with the load; tests must not depend on it, so the check here always finds bf16 no faster (fp32).
# Replaced at import, before any fixture trains (module-scoped ones run before function-scoped patches).
# tests/test_precision.py sets its own outcomes and times the real check.
from metalm.training import precision as _precision  # noqa: E402

REAL_CPU_BF16_SPEEDUP = _precision.cpu_bf16_speedup
_precision.cpu_bf16_speedup = lambda: 1.0

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 30522,
    "max_position_embeddings": 64,
}
TINY_VIT = {
    "model_type": "vit",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 16,
}

# The tiny model in the training-config schema (metalm.training.config.ModelConfig).
TINY_MODEL = {
    "decoder": TINY_LLAMA,
    "tokenizer": "packaged:minilm-l6",
    "encoders": [
        {"name": "text", "kind": "text", "source": "config", "tokenizer": "decoder", "config": TINY_BERT},
        {
            "name": "vision",
            "kind": "vision",
            "source": "config",
            "config": TINY_VIT,
            "image_size": 32,
            "connector": "mlp",
        },
    ],
    "semi_causal": {"span_min": 2, "span_max": 6},
}


def tiny_recipe(decoder: dict | None = None, connector: str = "linear", text_layers: int | None = None, **kw):
    from metalm import EncoderRecipe, ModelRecipe

    return ModelRecipe(
        decoder=decoder or TINY_LLAMA,
        tokenizer="packaged:minilm-l6",
        encoders=[
            EncoderRecipe(
                "text",
                "text",
                source="config",
                tokenizer="decoder",
                config=TINY_BERT,
                connector=connector,
                trainable_layers=text_layers,
            ),
            EncoderRecipe(
                "vision", "vision", source="config", config=TINY_VIT, image_size=32, connector="mlp"
            ),
        ],
        semi_causal={"span_min": 2, "span_max": 6},
        **kw,
    )


def build_tiny(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model, processor = tiny_recipe(**kw).build()
    model.eval()
    return model, processor


@pytest.fixture(scope="session")
def tiny():
    return build_tiny()


@pytest.fixture(scope="session")
def tiny_saved(tmp_path_factory, tiny):
    """The tiny text + vision MetaLM, saved: a start for `init_from` and `from_pretrained` (tests read it,
    none writes it)."""
    model, processor = tiny
    path = tmp_path_factory.mktemp("tiny_metalm")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (used by the evaluation tests: `pytest.mark.usefixtures`)."""
    # These forwards are tiny; on shared, busy cores two OpenMP threads wait on each other and run ~100x
    # slower than one (measured: 1 s vs 10 ms per forward at load 6 on 2 cores).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gpt_processor():
    """The processor of the GPT baseline: the tiny decoder, no encoders."""
    from metalm import ModelRecipe

    return ModelRecipe(decoder=TINY_LLAMA, tokenizer="packaged:minilm-l6").build()[1]


# --- serving: the saved model, a live server and an `openai` client (helpers: tests/serving_helpers.py) ---
@pytest.fixture(scope="session")
def serving_model_dir(tmp_path_factory) -> Path:
    """A tiny random MetaLM (text + vision encoders) saved once per session."""
    model, processor = build_tiny(seed=1)
    path = tmp_path_factory.mktemp("serving_model")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def live(serving_model_dir):
    """(engine, base URL) of a live server on the serving model, one per module; skips without uvicorn."""
    pytest.importorskip("uvicorn")
    from tests.serving_helpers import start_live_server

    engine, server = start_live_server(serving_model_dir)
    with server:
        yield engine, server.url
    engine.close()


@pytest.fixture(scope="module")
def client(live):
    """An `openai` client of the live server; skips without openai."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=live[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def load_script(name: str):
    """A module of ``scripts/`` (not a package), imported from its file: ``load_script("speech_results")``."""
    import importlib.util

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    if str(scripts) not in sys.path:  # a script imports its sibling modules, as when it is run
        sys.path.insert(0, str(scripts))
    path = scripts / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
