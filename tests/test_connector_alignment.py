"""Connector alignment (`model.encoders[].align_tokens`): encoder tokens are paired with the decoder token
under them, the linear connector is the least-squares map onto those tokens' embeddings, and a run fits it
before its first step."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from metalm.data.records import TextDocument
from metalm.modalities import get_modality
from metalm.model.connectors import LinearConnector, MLPConnector, fit_linear_connector
from metalm.training.config import ConfigError, config_from_dict
from metalm.training.connector_alignment import align_connectors, alignment_texts
from tests.conftest import TINY_MODEL
from tests.gemma_tiny import CORPUS, gemma_recipe, write_bpe_tokenizer

LINES = [line * 2 for line in CORPUS]  # every line 8+ words


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    torch.manual_seed(0)
    model, processor = gemma_recipe(str(write_bpe_tokenizer(tmp_path_factory.mktemp("bpe")))).build()
    return model.eval(), processor


def test_fit_recovers_a_linear_map_and_refuses_other_connectors():
    torch.manual_seed(0)
    x = torch.randn(500, 8)
    weight, bias = torch.randn(8, 5), torch.randn(5)
    connector = LinearConnector(8, 5)
    r2 = fit_linear_connector(connector, x, x @ weight + bias, ridge=1e-6)
    assert r2 > 0.999999
    assert torch.allclose(connector.proj.weight, weight.T, atol=1e-4)
    assert torch.allclose(connector.proj.bias, bias, atol=1e-4)
    with pytest.raises(ValueError, match="only a linear connector"):
        fit_linear_connector(MLPConnector(8, 5), x, x @ weight)


def test_each_encoder_token_reads_as_the_decoder_token_under_it(gemma):
    _, processor = gemma
    text = "The quick brown fox jumps over the lazy dog near the weather station."
    part, targets = get_modality("text").alignment_part(processor, "text", text)
    pieces = processor.preprocessors["text"].convert_ids_to_tokens(part.encoder_ids)
    assert part.encoder_ids == processor.preprocessors["text"](text, add_special_tokens=False)["input_ids"]
    assert len(targets) == len(pieces) > 10
    for piece, target in zip(pieces, targets):
        decoded = processor.tokenizer.decode([target]).lower()
        assert piece.lstrip("#")[0] in decoded, (piece, decoded)


def test_a_long_text_is_cut_to_the_span_limit(gemma):
    _, processor = gemma
    part, targets = get_modality("text").alignment_part(processor, "text", "word " * 500)
    limit = processor.config.encoder_spec("text")["max_length"] - 2  # [CLS] and [SEP]
    assert len(targets) == limit
    assert len(part.encoder_ids) == limit
    assert len(processor.tokenizer.decode(part.ids).split()) == limit  # the decoder side is cut there too


def _config(**encoder_settings):
    model = copy.deepcopy(TINY_MODEL)
    model["encoders"][0].update(encoder_settings)
    return config_from_dict({"model": model, "data": {"streams": [{"source": "pydoc"}]}})


def test_alignment_moves_the_connector_onto_the_decoder_embeddings(gemma):
    model, processor = gemma
    streams = [SimpleNamespace(records=[TextDocument(text=line) for line in LINES])]
    parts = [get_modality("text").alignment_part(processor, "text", t) for t in alignment_texts(streams)]
    batch = processor([[p] for p, _ in parts], add_bos=False)
    ids = torch.tensor([i for _, targets in parts for i in targets])

    def error() -> float:
        with torch.no_grad():
            slots = model.encode("text", batch["encoder_inputs"]["text"])  # the span tokens' slots, flat
            return float((slots - model.get_input_embeddings()(ids)).pow(2).mean())

    before = error()
    fits = align_connectors(model, processor, _config(align_tokens=10_000), streams)
    assert 0 < fits["text"] <= 1
    assert error() < 0.5 * before


def test_alignment_errors_name_the_setting(gemma):
    model, processor = gemma
    with pytest.raises(ConfigError, match=r"model.encoders \(text\).align_tokens: .*no text documents"):
        align_connectors(model, processor, _config(align_tokens=100), [SimpleNamespace(records=[])])
    config = _config()
    config.model.encoders[1].align_tokens = 100
    with pytest.raises(ConfigError, match=r"model.encoders \(vision\).align_tokens: .*does not read text"):
        align_connectors(model, processor, config, [SimpleNamespace(records=[TextDocument(text=LINES[0])])])
    with pytest.raises(Exception, match="align_tokens"):
        _config(align_tokens=0)


def test_a_run_aligns_before_its_first_step_and_not_on_resume(tmp_path):
    from metalm.training.trainer import train
    from tests.training_helpers import tiny_config

    raw = tiny_config(tmp_path / "run", optim={"max_steps": 1, "grad_accum": 1}, run={"save_every": 1})
    raw["model"]["encoders"][0]["align_tokens"] = 500
    train(config_from_dict(raw))
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("aligned to the decoder's word embeddings") == 1
    raw["optim"]["max_steps"] = 2
    train(config_from_dict(raw))  # resumes from the step-1 checkpoint: the trained connector stays
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("aligned to the decoder's word embeddings") == 1
