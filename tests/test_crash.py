"""Crash safety: training killed with SIGKILL at random moments (inside steps and inside checkpoint writes)
resumes each time from the last complete checkpoint and ends with the weights of an uninterrupted run;
damaged checkpoints are detected through their manifests; nothing in src/ unpickles code on load."""

from __future__ import annotations

import ast
import copy
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from metalm.training.config import config_from_dict
from tests.conftest import TINY_MODEL

SRC = Path(__file__).resolve().parent.parent / "src"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def crash_config(output_dir: Path) -> dict:
    return {
        # Dropout stays on: resume restores the RNG states, so even its masks repeat.
        "model": copy.deepcopy(TINY_MODEL),
        "data": {
            "streams": [{"source": "pydoc"}, {"source": "easy_vqa_captions"}],
            "seq_len": 48,
            "max_records": 40,
        },
        "optim": {"lr": 2e-3, "warmup_steps": 2, "max_steps": 16, "batch_size": 2, "grad_accum": 2},
        "run": {
            "output_dir": str(output_dir),
            "seed": 0,
            "log_every": 1,
            "eval_every": 0,
            "eval_batches": 1,
            "save_every": 2,
            "keep_checkpoints": 2,
            "tensorboard": False,
            # `metalm train` subprocesses have no conftest: fp32 everywhere, whatever `auto` would time.
            "mixed_precision": "no",
        },
    }


def complete_checkpoints(out: Path) -> list[int]:
    """Steps of the renamed (so: complete, see the trainer) checkpoint folders."""
    return sorted(int(m.group(1)) for p in out.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir())


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line cut by the kill
            pass
    return steps


class Launch:
    """`metalm train` in a subprocess, output to a log file."""

    def __init__(self, config_path: Path, log: Path, **env: str) -> None:
        self.log = log
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
        self.fh = open(log, "w")  # noqa: SIM115 (closed in wait/kill)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "metalm.cli", "train", str(config_path)],
            env=full_env,
            stdout=self.fh,
            stderr=subprocess.STDOUT,
        )

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.fh.close()

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self.fh.close()
        return code


def wait_for(condition, launch: Launch, timeout: float = 60.0) -> bool:
    """Poll until `condition()` holds (True) or the process ended (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if not launch.running():
            return False
        time.sleep(0.01)
    raise TimeoutError(f"gave up waiting; log:\n{launch.log.read_text()[-3000:]}")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path):
    from safetensors.torch import load_file

    from metalm.training.trainer import train, verify_checkpoint

    reference = train(config_from_dict(crash_config(tmp_path / "reference")))
    out = tmp_path / "crashy"
    out.mkdir()
    config_path = tmp_path / "crashy.yaml"
    config_path.write_text(yaml.safe_dump(crash_config(out)), encoding="utf-8")
    rng = random.Random(1234)
    # "checkpoint": killed while writing a checkpoint (the trainer sleeps there on the test hook's word);
    # "step": killed a random 0-0.3 s after the 1st to 4th step past the resume point was logged, which
    # lands inside steps, metric writes and checkpoint writes alike.
    plan = ["checkpoint", "step", "step", "checkpoint", "step"]
    kills: list[tuple[str, int | None]] = []  # (where, newest complete checkpoint after the kill)
    for n, where in enumerate(plan):
        before = complete_checkpoints(out)
        resume_step = before[-1] if before else 0
        t0 = time.time()

        def fresh(path: Path, t0: float = t0) -> bool:  # written by this launch, not a killed one
            return path.is_file() and path.stat().st_mtime > t0

        if where == "checkpoint":
            # Every write pauses 1.5 s before its manifest; the first one of this launch completes, the
            # second is killed in the pause.
            launch = Launch(config_path, tmp_path / f"launch{n}.log", METALM_TEST_SLOW_CHECKPOINT="1.5")
            second = f"checkpoint-{resume_step + 4}.tmp"
            hit = wait_for(lambda p=out / second / "trainer_state.json": fresh(p), launch)
        else:
            launch = Launch(config_path, tmp_path / f"launch{n}.log")
            # metrics.jsonl is rewritten at start-up (rows up to the checkpoint), then grows step by step.
            target = resume_step + rng.randint(1, 4)
            hit = wait_for(
                lambda t=target: fresh(out / "metrics.jsonl") and any(s >= t for s in logged_steps(out)),
                launch,
            )
            time.sleep(rng.uniform(0.0, 0.3))
        if not hit or not launch.running():
            launch.wait(timeout=60)
            break  # the run got to the end first
        launch.kill()
        after = complete_checkpoints(out)
        kills.append((where, after[-1] if after else None))
        if where == "checkpoint":  # the interrupted write left its .tmp folder, the one before is whole
            assert (out / second).is_dir() and not (out / second / "manifest.json").exists()
            assert after[-1] == resume_step + 2
        if after:  # the newest renamed checkpoint is always complete: the rename comes last
            assert verify_checkpoint(out / f"checkpoint-{after[-1]}") is None
        if n:  # each launch resumed from the newest complete checkpoint present when it started
            expected = f"checkpoint-{resume_step}" if resume_step else None
            log = launch.log.read_text()
            if expected:
                assert f"resumed from {out / expected} at step {resume_step}" in log, log[-3000:]
    assert len(kills) >= 3, kills
    assert any(where == "checkpoint" for where, _ in kills)

    last = complete_checkpoints(out)[-1]
    final = Launch(config_path, tmp_path / "final.log")
    assert final.wait(timeout=120) == 0, (tmp_path / "final.log").read_text()[-3000:]
    log = (tmp_path / "final.log").read_text()
    assert f"resumed from {out / f'checkpoint-{last}'} at step {last}" in log
    if list(out.glob("checkpoint-*.tmp")):
        assert "ignoring incomplete checkpoint" in log

    expected = load_file(reference.final_dir / "model.safetensors")
    got = load_file(out / "final" / "model.safetensors")
    assert sorted(got) == sorted(expected)
    differ = [name for name in expected if not torch.equal(expected[name], got[name])]
    for name in differ:  # bitwise on this machine; 1e-6 would still be exact resume
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    rows = logged_steps(out)
    assert rows == list(range(1, 17)), rows  # every step once, none repeated by a resume


# --------------------------------------------------------------------------------------------
# Damaged checkpoints


def fake_checkpoint(folder: Path, step: int, world_size: int = 1) -> Path:
    from metalm.training.checkpoint import write_checkpoint_manifest as _write_manifest

    ckpt = folder / f"checkpoint-{step}"
    (ckpt / "model").mkdir(parents=True)
    names = ["trainer_state.json", "optimizer.pt", "scheduler.pt", "data.json", "model/config.json"]
    names += ["model/model.safetensors"] + [f"rng_rank{r}.pt" for r in range(world_size)]
    for name in names:
        (ckpt / name).write_bytes(f"{name} of step {step}".encode() * 10)
    _write_manifest(ckpt, step, world_size)
    return ckpt


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda c: (c / "optimizer.pt").write_bytes(b"short"), "optimizer.pt has 5 bytes"),
        (lambda c: (c / "model" / "config.json").unlink(), "model/config.json is missing"),
        (lambda c: (c / "manifest.json").unlink(), "no manifest.json"),
        (lambda c: (c / "manifest.json").write_text("{not json"), "unreadable manifest.json"),
        (
            lambda c: (c / "data.json").write_bytes((c / "data.json").read_bytes()[::-1]),
            "data.json does not match its sha256",
        ),
        (lambda c: (c / "rng_rank1.pt").unlink(), "rng_rank1.pt is missing"),
        # The model's weights: a checker that skipped them would let both through.
        (lambda c: flip_byte(c / "model" / "model.safetensors"), "model/model.safetensors does not match"),
        (lambda c: cut_in_half(c / "model" / "model.safetensors"), "model/model.safetensors has 165 bytes"),
    ],
    ids=[
        "truncated",
        "missing-file",
        "no-manifest",
        "bad-manifest",
        "flipped",
        "missing-rank-file",
        "weights-flipped",
        "weights-truncated",
    ],
)
def test_damaged_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, caplog, damage, reason):
    from metalm.training.trainer import find_checkpoint, verify_checkpoint

    good = fake_checkpoint(tmp_path, 2, world_size=2)
    bad = fake_checkpoint(tmp_path, 4, world_size=2)
    assert verify_checkpoint(bad) is None
    damage(bad)
    assert reason in verify_checkpoint(bad)
    with caplog.at_level(logging.WARNING, logger="metalm"):
        assert find_checkpoint(tmp_path) == good
    assert any("checkpoint-4" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_manifest_requires_every_rank_file(tmp_path):
    from metalm.training.trainer import verify_checkpoint

    ckpt = fake_checkpoint(tmp_path, 2, world_size=2)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["rng_rank1.pt"]  # a manifest written before rank 1's file was there
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert "rng_rank1.pt is not in the manifest" in verify_checkpoint(ckpt)


def test_manifest_requires_the_model_weights(tmp_path):
    from metalm.training.trainer import verify_checkpoint

    ckpt = fake_checkpoint(tmp_path, 2)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["model/model.safetensors"]  # a manifest that never vouched for the weights
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert "model/model.safetensors is not in the manifest" in verify_checkpoint(ckpt)


def test_manifest_requires_every_weight_shard(tmp_path):
    from metalm.training.checkpoint import verify_checkpoint
    from metalm.training.checkpoint import write_checkpoint_manifest as _write_manifest

    ckpt = fake_checkpoint(tmp_path, 2)
    (ckpt / "model" / "model.safetensors").unlink()
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}
    (ckpt / "model" / "model.safetensors.index.json").write_text(json.dumps(index))
    for shard in shards:
        (ckpt / "model" / shard).write_bytes(shard.encode())
    _write_manifest(ckpt, 2)
    assert verify_checkpoint(ckpt) is None
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"][f"model/{shards[1]}"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert f"model/{shards[1]} is not in the manifest" in verify_checkpoint(ckpt)


# --------------------------------------------------------------------------------------------
# Resume when no checkpoint is good: refuse, unless asked to start over


def write_config(tmp_path: Path, out: Path) -> Path:
    cfg = crash_config(out)
    cfg["optim"]["max_steps"] = 2
    cfg["run"]["save_every"] = 0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_resume_refuses_when_no_checkpoint_verifies(tmp_path):
    from metalm.training.cli import train_main

    out = tmp_path / "run"
    flip_byte(fake_checkpoint(out, 2) / "optimizer.pt")
    (fake_checkpoint(out, 4) / "manifest.json").unlink()
    with pytest.raises(SystemExit) as info:  # `metalm train` exits with status 1 and this message
        train_main(str(write_config(tmp_path, out)), [])
    message = str(info.value.code)
    assert message.startswith("error: cannot resume: no checkpoint in")
    assert "checkpoint-2: optimizer.pt does not match its sha256" in message
    assert "checkpoint-4: no manifest.json" in message
    assert "run.resume=restart" in message and "--restart" in message
    # Nothing was set aside, nothing trained.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert not (out / "final").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_restart_sets_every_checkpoint_aside_and_trains_from_step_0(tmp_path):
    from metalm.cli import build_parser

    out = tmp_path / "run"
    fake_checkpoint(out, 2)
    (fake_checkpoint(out, 4) / "manifest.json").unlink()
    args = build_parser(["train"]).parse_args(["train", str(write_config(tmp_path, out)), "--restart"])
    assert args.resume == "restart"
    args.func(args)
    assert (out / "checkpoint-2.old").is_dir() and (out / "checkpoint-4.old").is_dir()
    assert not (out / "checkpoint-2").exists() and not (out / "checkpoint-4").exists()
    assert logged_steps(out) == [1, 2]
    assert (out / "final" / "manifest.json").is_file()


# --------------------------------------------------------------------------------------------
# Loading never executes pickled code


def _python_sources() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20, files
    return files


def test_every_torch_load_in_src_is_weights_only():
    offenders = []
    for path in _python_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name != "load":
                continue
            owner = func.value if isinstance(func, ast.Attribute) else None
            if not (isinstance(owner, ast.Name) and owner.id == "torch"):
                continue
            safe = any(
                kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                for kw in node.keywords
            )
            if not safe:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"
    # The text too (the AST check cannot see through aliases such as `load = torch.load`).
    for path in _python_sources():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if (
                "torch.load(" in line
                and "weights_only=True" not in line
                and not line.lstrip().startswith("#")
            ):
                assert "weights_only=True" in "".join(path.read_text().splitlines()[n - 1 : n + 3]), (
                    f"{path.relative_to(SRC)}:{n}: torch.load without weights_only=True"
                )


def test_src_never_imports_pickle():
    banned = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    offenders = []
    for path in _python_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                if mod.split(".")[0] in banned:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: {mod}")
        if re.search(
            r"__import__\(\s*['\"](pickle|dill|cloudpickle|joblib)", path.read_text(encoding="utf-8")
        ):
            offenders.append(f"{path.relative_to(SRC)}: __import__ of a pickle module")
    assert not offenders, offenders


def test_checkpoint_files_load_with_weights_only(tmp_path):
    """What the trainer saves with torch.save (RNG, optimizer, scheduler state) is plain tensors and numbers."""
    from metalm.training.checkpoint import capture_rng_state as _rng_state
    from metalm.training.checkpoint import restore_rng_state as _set_rng_state

    torch.save(_rng_state(), tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    before = torch.rand(3)
    _set_rng_state(state)
    assert torch.equal(torch.rand(3), before)
    evil = tmp_path / "evil.pt"
    torch.save({"x": copy.deepcopy(Path("x"))}, evil)  # an arbitrary object needs unpickling: refused
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        torch.load(evil, weights_only=True)
