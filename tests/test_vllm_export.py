"""The vLLM engine's parts that need no vLLM: the decoder's export folder (written once, found again by
its digest, a changed decoder gets a new one), the `serve` options, and the missing-environment error."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from metalm.data.processor import continuation_pieces
from metalm.serving.cli import add_serve_parser
from metalm.serving.vllm_export import SIDECAR, export_decoder
from metalm.serving.vllm_process import VLLMProcess, VLLMSettings, VLLMStartError, vllm_settings_from_args
from tests.conftest import build_tiny


def test_export_is_written_once_and_keyed_by_the_weights(tmp_path):
    model, processor = build_tiny(seed=3)
    first = export_decoder(model.decoder, processor, tmp_path)
    assert (first / "config.json").is_file() and (first / "tokenizer_config.json").is_file()
    sidecar = json.loads((first / SIDECAR).read_text())
    assert sidecar["first_token_ban"] == continuation_pieces(processor.tokenizer) != []
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert export_decoder(model.decoder, processor, tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime  # found, not rewritten
    with torch.no_grad():
        next(model.decoder.parameters()).add_(1.0)
    assert export_decoder(model.decoder, processor, tmp_path) != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]  # no staging left


def test_serve_options_make_vllm_settings():
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", "m"])
    assert vllm_settings_from_args(args) is None
    args = parser.parse_args(
        ["serve", "--model", "m", "--engine", "vllm", "--vllm-threads", "1", "--vllm-arg=--enforce-eager"]
    )
    settings = vllm_settings_from_args(args)
    assert settings.threads == 1 and settings.extra_args == ["--enforce-eager"] and settings.url is None


def test_missing_vllm_environment_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("METALM_VLLM_PYTHON", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("metalm.serving.vllm_process.find_vllm_python", lambda explicit=None: None)
    with pytest.raises(VLLMStartError, match="make vllm"):
        VLLMProcess(tmp_path, VLLMSettings(), dtype="float32", max_model_len=64, max_num_seqs=1)
