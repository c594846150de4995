"""Distributed training on CPU (gloo, 2 processes under torchrun): DDP and FSDP2 with 2 processes x batch B
train exactly like 1 process x batch 2B, and checkpoints move between numbers of processes (2 -> 1, 1 -> 2).

What makes it exact (see metalm.training.data / trainer): one global sample sequence of which rank r
trains on its slice of each global micro-batch; each micro-batch's loss normalised by the global number of
target tokens (times the number of processes, which DDP/FSDP average over); dropout off (dropout masks
are drawn per process, so with dropout the runs agree only statistically); checkpoints that hold the
full model and optimizer state keyed by parameter name, and a global data position.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from metalm.training.config import config_from_dict
from tests.conftest import TINY_BERT, TINY_LLAMA, TINY_MODEL

# Measured (torch 2.13 CPU, 2 processes): losses agree to ~1e-7 relative, weights to ~3e-7 absolute.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
BATCH = 2  # per process; the single-process run uses 2 * BATCH

TINY = copy.deepcopy(TINY_MODEL)
# Tied embeddings (as in the quickstart): FSDP must keep the tie through sharding and saving.
TINY["decoder"] = {**TINY_LLAMA, "tie_word_embeddings": True}
TINY["encoders"][0].update(
    # Dropout off: its masks are drawn per process.
    config={**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    # MiniLM-style: the first layer frozen, the last two trainable, in one FSDP unit.
    trainable_layers=2,
)


def dist_config(output_dir: Path, batch_size: int = BATCH, **run) -> dict:
    return {
        "model": copy.deepcopy(TINY),
        "data": {
            # Mixed per sample: some micro-batches give one rank images and the other none (FSDP then
            # needs a filler row so that both ranks run the vision encoder).
            "streams": [
                {"name": "docs", "source": "pydoc"},
                {"name": "captions", "source": "easy_vqa_captions"},
            ],
            "seq_len": 48,
            "max_records": 40,
        },
        "optim": {"lr": 2e-3, "warmup_steps": 1, "max_steps": 4, "batch_size": batch_size, "grad_accum": 2},
        "run": {
            "output_dir": str(output_dir),
            "seed": 0,
            "log_every": 1,
            "eval_every": 2,
            "eval_batches": 1,
            "save_every": 2,
            "keep_checkpoints": 3,
            "tensorboard": False,
            **run,
        },
    }


def torchrun(config: dict, nproc: int = 2, timeout: float = 120) -> Path:
    """Train `config` under `torchrun --standalone` (a free port) with `nproc` CPU processes (gloo)."""
    out = Path(config["run"]["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "metalm.cli", "train", str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def logged(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def assert_same_losses(a: dict[int, dict], b: dict[int, dict], steps) -> None:
    for step in steps:
        for key in ("loss", "val_loss"):
            if key in a[step] or key in b[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=LOSS_RTOL), (step, key)


def assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(wa) == sorted(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """1 process x batch 2B, in this process."""
    from metalm.training.trainer import train

    out = tmp_path_factory.mktemp("single") / "run"
    train(config_from_dict(dist_config(out, batch_size=2 * BATCH)))
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return torchrun(dist_config(tmp_path_factory.mktemp("fsdp") / "run", fsdp=True))


# --------------------------------------------------------------------------------------------
# The data: one global sequence


def test_global_batches_do_not_depend_on_world_size(tiny, tmp_path):
    from metalm.training.data import build_data

    _, p = tiny
    cfg = config_from_dict(dist_config(tmp_path, batch_size=4))

    def rows(batch: dict) -> list[tuple]:
        mask = batch["attention_mask"].bool()
        return [
            (tuple(batch["input_ids"][i][mask[i]].tolist()), tuple(batch["labels"][i][mask[i]].tolist()))
            for i in range(mask.shape[0])
        ]

    one, _ = build_data(cfg.data, p, batch_size=4, seed=0)
    ranks = [
        build_data(cfg.data, p, batch_size=2, seed=0, rank=r, world_size=2, fill_encoders=True)[0]
        for r in range(2)
    ]
    fillers = 0
    for _ in range(12):
        expected = one.next_batch()
        got, sources = [], []
        for data in ranks:
            batch = data.next_batch()
            real = rows(batch)[: len(data.last_sources)]
            if len(rows(batch)) > len(data.last_sources):  # a filler row: no labels, an encoder the
                fillers += 1  # other rank needs and this one lacks
                assert (batch["labels"][-1] == -100).all()
            got += real
            sources += data.last_sources
        assert got == rows(expected)
        assert sources == one.last_sources
    assert fillers > 0, "the test data should need a filler row at least once"
    # The state is global: what two ranks saved continues in one process with the same global batch.
    state = json.loads(json.dumps(ranks[1].state_dict()))
    assert state == {**one.state_dict(), "batch_size": 2, "world_size": 2}
    again, _ = build_data(cfg.data, p, batch_size=4, seed=0)
    again.load_state_dict(state)
    assert rows(again.next_batch()) == rows(one.next_batch())
    # Another global batch size continues the sample sequence (the trainer warns) but not by default.
    smaller, _ = build_data(cfg.data, p, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="global micro-batch"):
        smaller.load_state_dict(state)
    smaller.load_state_dict(state, strict=False)
    assert smaller.stats["samples"] == state["stats"]["samples"]


# --------------------------------------------------------------------------------------------
# 2 processes x B == 1 process x 2B


@pytest.mark.slow
def test_ddp_two_processes_equal_one(single, tmp_path):
    out = torchrun(dist_config(tmp_path / "ddp"))
    a, b = logged(single), logged(out)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert_same_losses(a, b, [1, 2, 3, 4])
    for step in a:  # the norm is summed in fp32 (torch): agreement to ~1e-4 only
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-3)
    assert b[4]["tokens"] == a[4]["tokens"]
    assert_same_weights(single / "final", out / "final")
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and "train.log" in os.listdir(out)


@pytest.mark.slow
def test_fsdp_two_processes_equal_one(single, fsdp_run):
    from transformers import AutoModelForCausalLM

    from metalm.training.trainer import verify_checkpoint

    a, b = logged(single), logged(fsdp_run)
    assert_same_losses(a, b, [1, 2, 3, 4])
    assert "(FSDP2)" in (fsdp_run / "train.log").read_text()
    assert_same_weights(single / "final", fsdp_run / "final")
    # Frozen parameters inside a sharded unit stayed as they were.
    start = AutoModelForCausalLM.from_pretrained(fsdp_run / "checkpoint-2" / "model")
    end = AutoModelForCausalLM.from_pretrained(fsdp_run / "final")
    frozen = "encoders.text.backbone.encoder.layer.0.attention.self.query.weight"
    trained = "encoders.text.backbone.encoder.layer.2.attention.self.query.weight"
    assert torch.equal(start.state_dict()[frozen], end.state_dict()[frozen])
    assert not torch.equal(start.state_dict()[trained], end.state_dict()[trained])
    assert end.decoder.lm_head.weight is end.decoder.model.embed_tokens.weight  # the tie survived
    # The checkpoint holds the full optimizer state keyed by parameter name (not shards).
    ckpt = fsdp_run / "checkpoint-4"
    assert verify_checkpoint(ckpt) is None
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert frozen not in optimizer["state"] and trained in optimizer["state"]
    exp_avg = optimizer["state"][trained]["exp_avg"]
    assert type(exp_avg) is torch.Tensor and exp_avg.shape == end.state_dict()[trained].shape
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("rng_rank")) == [
        "rng_rank0.pt",
        "rng_rank1.pt",
    ]


# --------------------------------------------------------------------------------------------
# Checkpoints across numbers of processes


@pytest.mark.slow
def test_checkpoint_from_two_processes_resumes_in_one(single, fsdp_run, tmp_path):
    from metalm.training.trainer import train

    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(fsdp_run / "checkpoint-2", out / "checkpoint-2")
    result = train(config_from_dict(dist_config(out, batch_size=2 * BATCH)))
    assert result.resumed_from.name == "checkpoint-2" and sorted(result.losses) == [3, 4]
    assert "saved by 2 process(es), now 1" in (out / "train.log").read_text()
    assert_same_losses(logged(single), logged(out), [1, 2, 3, 4])
    assert_same_weights(single / "final", out / "final")


@pytest.mark.slow
def test_checkpoint_from_one_process_resumes_in_two_with_fsdp(single, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(single / "checkpoint-2", out / "checkpoint-2")
    torchrun(dist_config(out, fsdp=True))
    assert "saved by 1 process(es), now 2" in (out / "train.log").read_text()
    assert_same_losses(logged(single), logged(out), [1, 2, 3, 4])
    assert_same_weights(single / "final", out / "final")


# --------------------------------------------------------------------------------------------
# Launcher configs shipped in configs/


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_accelerate_and_deepspeed_configs_parse():
    from types import SimpleNamespace

    from accelerate.commands.config.config_args import load_config_from_file

    from metalm.training.parallel import fill_deepspeed_config as _fill_deepspeed_config

    kinds = {
        p.name: str(load_config_from_file(str(p)).distributed_type)
        for p in sorted((CONFIGS / "accelerate").glob("*.yaml"))
    }
    assert kinds == {
        "ddp.yaml": "DistributedType.MULTI_GPU",
        "deepspeed-zero2.yaml": "DistributedType.DEEPSPEED",
        "deepspeed-zero3.yaml": "DistributedType.DEEPSPEED",
        "fsdp2.yaml": "DistributedType.FSDP",
    }
    fsdp = yaml.safe_load((CONFIGS / "accelerate" / "fsdp2.yaml").read_text())
    assert fsdp["fsdp_config"]["fsdp_version"] == 2
    for stage in (2, 3):
        accel = yaml.safe_load((CONFIGS / "accelerate" / f"deepspeed-zero{stage}.yaml").read_text())
        path = Path(__file__).resolve().parent.parent / accel["deepspeed_config"]["deepspeed_config_file"]
        ds = json.loads(path.read_text())
        assert ds["zero_optimization"]["stage"] == stage
        # The values accelerate would take from a DataLoader come from the training config instead.
        acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))
        acc.num_processes = 4
        optim = config_from_dict(dist_config(Path("x"))).optim
        _fill_deepspeed_config(acc, optim)
        assert ds["train_micro_batch_size_per_gpu"] == BATCH and ds["gradient_accumulation_steps"] == 2
        assert ds["train_batch_size"] == BATCH * 2 * 4 and ds["gradient_clipping"] == 1.0


def test_a_finished_run_destroys_its_process_group(tmp_path):
    """`metalm train` under torchrun destroys the process group once training has ended well, before
    interpreter exit: left to it, gloo's threads now and then abort a finished rank (exit code -6)."""
    from metalm.training.cli import _end_process_group

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.distributed.all_reduce(torch.ones(1))  # a collective, as training runs them
        _end_process_group()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    _end_process_group()  # nothing to end: a one-process run has no group
