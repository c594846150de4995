"""Sharded streaming sources (metalm.data.shards, metalm.training.streaming): img2dataset WebDataset shards
and Parquet read as they stream, every record once per epoch over any number of processes, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metalm.data.records import ImageText, TextDocument
from metalm.data.shards import ShardReader, expand_source, is_sharded_source
from metalm.training.config import ConfigError, DataConfig, config_from_dict
from metalm.training.data import build_data
from metalm.training.loader import BatchLoader
from metalm.training.streaming import ShardedDataStream
from tests.shard_data import caption, write_parquet, write_webdataset


def sharded_data(tmp_path: Path, *, text: bool = True, **data) -> DataConfig:
    write_webdataset(tmp_path / "wds", 4, 10)
    streams = [{"source": str(tmp_path / "wds/{00000..00003}.tar"), "shuffle_buffer": 8}]
    if text:
        write_parquet(tmp_path / "pq", 2, 10)
        streams.append(
            {
                "source": str(tmp_path / "pq/*.parquet"),
                "kind": "text",
                "fields": {"text": "body", "id": "doc_id"},
            }
        )
    return DataConfig(streams=streams, seq_len=48, **data)


def ids_of(stream: ShardedDataStream) -> list[tuple[str, list[str]]]:
    """(stream, record ids) per row of the last batch."""
    return [
        (n, [stream.streams[stream.names.index(n)].records[i].id for i in idx])
        for n, idx in stream.last_sources
    ]


def same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(x[key], y[key])
        if x["encoder_inputs"] is not None:
            for name, inputs in x["encoder_inputs"].items():
                for k, v in inputs.items():
                    if isinstance(v, torch.Tensor):
                        assert torch.equal(v, y["encoder_inputs"][name][k])


def test_sources_that_stream(tmp_path):
    write_webdataset(tmp_path / "wds", 3, 2)
    assert is_sharded_source(str(tmp_path / "wds/{00000..00002}.tar"))
    assert is_sharded_source(str(tmp_path / "wds"))  # a folder of tar shards
    assert is_sharded_source(str(tmp_path / "wds/00000.tar"))
    assert not is_sharded_source(str(tmp_path / "x.jsonl"))  # JSONL stays in memory unless asked
    assert is_sharded_source(str(tmp_path / "x.jsonl"), streaming=True)
    assert len(expand_source(str(tmp_path / "wds/{00000..00002}.tar"))) == 3
    assert len(expand_source(str(tmp_path / "wds/*.tar"))) == 3
    with pytest.raises(FileNotFoundError):
        expand_source(str(tmp_path / "wds/{00005..00009}.tar"))


def test_img2dataset_shards_train_as_image_text_pairs(tiny, tmp_path):
    _, processor = tiny
    train, val = build_data(sharded_data(tmp_path, text=False), processor, batch_size=4, seed=0)
    assert isinstance(train, ShardedDataStream) and val is None
    batch = train.next_batch()
    assert batch["encoder_inputs"]["vision"]["pixel_values"].shape == (4, 3, 32, 32)
    stream = train.streams[0]
    rec = stream.records[train.last_sources[0][1][0]]
    assert isinstance(rec, ImageText) and isinstance(rec.image, bytes)
    assert rec.text == caption(int(rec.id))  # txt member, id from the key


def test_parquet_text_is_packed_into_windows_with_a_field_mapping(tiny, tmp_path):
    _, processor = tiny
    write_parquet(tmp_path / "pq", 2, 10)
    data = DataConfig(
        streams=[
            {"source": str(tmp_path / "pq"), "kind": "text", "fields": {"text": "body", "id": "doc_id"}}
        ],
        seq_len=48,
    )
    train, _ = build_data(data, processor, batch_size=3, seed=0)
    batch = train.next_batch()
    assert batch["input_ids"].shape == (3, 48)  # full windows
    docs = [i for _, idx in ids_of(train) for i in idx]
    assert all(d.startswith("d") for d in docs) and len(docs) > 3
    assert all(isinstance(r, TextDocument) for r in train.streams[0].records.values())


def test_one_process_reads_every_record_once_per_epoch(tmp_path):
    keys = write_webdataset(tmp_path / "wds", 4, 10)
    reader = ShardReader(str(tmp_path / "wds"), name="wds", seed=3, split="train", buffer=7)
    first = [reader.read()[1]["__key__"] for _ in range(40)]
    second = [reader.read()[1]["__key__"] for _ in range(40)]
    assert sorted(first) == keys and sorted(second) == keys
    assert first != keys and first != second  # shuffled, differently per epoch


def test_processes_split_the_shards(tmp_path):
    keys = write_webdataset(tmp_path / "wds", 4, 10)
    seen = []
    for rank in range(2):
        reader = ShardReader(
            str(tmp_path / "wds"), name="wds", seed=0, split="train", rank=rank, world_size=2
        )
        seen += [reader.read()[1]["__key__"] for _ in range(20)]
        assert reader.epoch == 0
    assert sorted(seen) == keys


def test_bad_config_for_a_sharded_stream(tmp_path):
    write_webdataset(tmp_path / "wds", 1, 2)
    source = str(tmp_path / "wds/*.tar")
    for extra, message in (
        ({"validation_fraction": 0.1}, "validation_source"),
        ({"kind": "interleaved"}, "not 'interleaved'"),
        ({"fields": {"picture": "jpg"}}, "unknown record field 'picture'"),
    ):
        cfg = {
            "model": {"decoder": {"model_type": "llama"}, "tokenizer": "t"},
            "data": {"streams": [{"source": source, **extra}]},
        }
        with pytest.raises(ConfigError, match=message):
            config_from_dict(cfg)
    cfg = {
        "model": {"decoder": {"model_type": "llama"}, "tokenizer": "t"},
        "data": {"streams": [{"source": str(tmp_path / "none/*.tar")}]},
    }
    with pytest.raises(ConfigError, match="no shard files"):
        config_from_dict(cfg)


@pytest.mark.parametrize("steps", [1, 5, 9])
def test_resume_gives_the_batches_of_an_uninterrupted_run(tiny, tmp_path, steps):
    _, processor = tiny
    data = sharded_data(tmp_path)
    whole, _ = build_data(data, processor, batch_size=3, seed=1)
    expected = whole.take(steps + 6)
    first, _ = build_data(data, processor, batch_size=3, seed=1)
    first.take(steps)
    state = json.loads(json.dumps(first.state_dict()))
    resumed, _ = build_data(data, processor, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    same_batches(resumed.take(6), expected[steps:])
    assert resumed.stats["samples"] == whole.stats["samples"]


def test_resume_refuses_another_number_of_processes(tiny, tmp_path):
    _, processor = tiny
    data = sharded_data(tmp_path, text=False)
    one, _ = build_data(data, processor, batch_size=2, seed=0)
    one.take(1)
    two, _ = build_data(data, processor, batch_size=2, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="same number of processes"):
        two.load_state_dict(one.state_dict())


def test_loader_workers_give_the_same_batches_and_state(tiny, tmp_path):
    _, processor = tiny
    data = sharded_data(tmp_path)
    plain, _ = build_data(data, processor, batch_size=2, seed=0)
    expected = plain.take(6)
    stream, _ = build_data(data, processor, batch_size=2, seed=0)
    loader = BatchLoader(stream, num_workers=2)
    try:
        got = [loader.next().inputs for _ in range(4)]
    finally:
        loader.close()
    same_batches(got, expected[:4])
    stream.load_state_dict(json.loads(json.dumps(stream.state_dict())))  # the state the workers reported
    same_batches(stream.take(2), expected[4:])


# --------------------------------------------------------------------------------------------
# Two processes (gloo) and `metalm train` killed with SIGKILL


def _epoch_ids(rank: int, world: int, folder: str, port: int, out: str) -> None:
    """One process of a gloo group: one epoch of its own rows; rank 0 writes every rank's record ids."""
    import torch.distributed as dist

    from tests.conftest import build_tiny

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    _, processor = build_tiny()
    data = DataConfig(streams=[{"source": f"{folder}/{{00000..00003}}.tar", "shuffle_buffer": 4}], seq_len=48)
    train, _ = build_data(data, processor, batch_size=2, seed=5, rank=rank, world_size=world)
    ids = []
    for _ in range(10):  # 20 rows: this process's 2 shards of 10 records
        train.next_batch()
        ids += [i for _, idx in ids_of(train) for i in idx]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, ids)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_see_every_record_once_per_epoch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    keys = write_webdataset(tmp_path / "wds", 4, 10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ids.json"
    mp.spawn(_epoch_ids, args=(2, str(tmp_path / "wds"), port, str(out)), nprocs=2, join=True)
    per_rank = json.loads(out.read_text())
    assert all(len(ids) == 20 for ids in per_rank)
    assert sorted(per_rank[0] + per_rank[1]) == keys  # every record once, no record on both


def sigkill_config(tmp_path: Path, output_dir: Path) -> dict:
    from tests.conftest import TINY_MODEL

    write_webdataset(tmp_path / "wds", 4, 10)
    write_parquet(tmp_path / "pq", 2, 10)
    return {
        "model": TINY_MODEL,
        "data": {
            "streams": [
                {
                    "name": "pairs",
                    "source": str(tmp_path / "wds/{00000..00003}.tar"),
                    "fields": {"image": "jpg", "text": "txt"},
                },
                {
                    "name": "docs",
                    "source": str(tmp_path / "pq/*.parquet"),
                    "kind": "text",
                    "fields": {"text": "body"},
                },
            ],
            "seq_len": 48,
        },
        "optim": {"lr": 2e-3, "max_steps": 8, "batch_size": 2, "grad_accum": 2},
        "run": {
            "output_dir": str(output_dir),
            "log_every": 1,
            "eval_batches": 0,
            "save_every": 2,
            "tensorboard": False,
            "mixed_precision": "no",
        },
    }


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_trains_on_the_same_samples(tmp_path):
    import yaml
    from safetensors.torch import load_file

    from metalm.training.config import config_from_dict
    from metalm.training.trainer import train
    from tests.test_crash import Launch, complete_checkpoints, wait_for

    reference = train(config_from_dict(sigkill_config(tmp_path, tmp_path / "reference")))
    out = tmp_path / "killed"
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(sigkill_config(tmp_path, out)), encoding="utf-8")
    launch = Launch(config_path, tmp_path / "first.log")
    assert wait_for(lambda: out.is_dir() and 4 in complete_checkpoints(out), launch, timeout=120)
    launch.kill()  # SIGKILL, mid-epoch (an epoch of pairs is 40 records, 8 steps read 32)
    resumed = Launch(config_path, tmp_path / "second.log")
    assert resumed.wait(timeout=180) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "second.log").read_text()
    expected = load_file(reference.final_dir / "model.safetensors")
    got = load_file(out / "final" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    saved = json.loads((out / "checkpoint-8" / "data.json").read_text())
    assert saved["stats"]["samples"] == 8 * 2 * 2 and saved["version"] == "sharded-1"


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("easy_vqa_captions", "webdataset"), ("easy_vqa_vqa", "webdataset"), ("bbc_news_text", "parquet")],
)
def test_exported_shards_train(tiny, tmp_path, name, fmt):
    from metalm.data.cli import export

    _, processor = tiny
    export(name, ["validation"], str(tmp_path), fmt, 50)
    suffix = "tar" if fmt == "webdataset" else "parquet"
    assert len(list(tmp_path.glob(f"{name}-validation-*.{suffix}"))) > 1
    kind = {"easy_vqa_vqa": "vqa", "bbc_news_text": "text"}.get(name)
    stream = {"source": str(tmp_path / f"{name}-validation-*.{suffix}"), **({"kind": kind} if kind else {})}
    train, _ = build_data(DataConfig(streams=[stream], seq_len=48), processor, batch_size=2, seed=0)
    batch = train.next_batch()
    assert (batch["labels"] != -100).any()


def test_hf_folder_and_jsonl_stream_when_asked(tiny, tmp_path):
    import datasets

    from tests.shard_data import tiny_jpeg

    _, processor = tiny
    rows = {
        "image": [{"bytes": tiny_jpeg(i), "path": None} for i in range(6)],
        "caption": [caption(i) for i in range(6)],
    }
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": caption(i) * 3, "id": f"j{i}"}) + "\n" for i in range(6))
    )
    data = DataConfig(
        streams=[
            {"source": str(tmp_path / "hf"), "streaming": True, "kind": "image_text"},
            {"source": str(tmp_path / "docs.jsonl"), "streaming": True, "kind": "text"},
        ],
        seq_len=48,
    )
    train, _ = build_data(data, processor, batch_size=4, seed=0, rank=1, world_size=2)
    seen = {n: set() for n in train.names}
    for _ in range(4):
        train.next_batch()
        for name, ids in ids_of(train):
            seen[name] |= set(ids)
    assert seen["docs"] <= {f"j{i}" for i in range(6)} and seen["docs"]
    assert train.streams[0].records and all(
        isinstance(r.image, bytes) for r in train.streams[0].records.values()
    )


@pytest.mark.slow
def test_two_nodes_of_one_process_each_train_on_their_own_shards(tmp_path):
    """The multi-node recipe of docs/training.md, on one machine: `torchrun --nnodes 2` started twice."""
    import os
    import socket
    import subprocess
    import sys

    import yaml

    config = sigkill_config(tmp_path, tmp_path / "run")
    config["optim"]["max_steps"] = 4
    config["run"]["save_every"] = 4
    path = tmp_path / "nodes.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "metalm.cli",
                "train",
                str(path),
            ],
            env=env,
            stdout=open(tmp_path / f"node{rank}.log", "w"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for rank in range(2)
    ]
    for rank, node in enumerate(nodes):
        assert node.wait(timeout=300) == 0, (tmp_path / f"node{rank}.log").read_text()[-3000:]
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "data.json").read_text())
    assert sorted(state["ranks"]) == ["0", "1"] and state["world_size"] == 2
    assert state["stats"]["samples"] == 4 * 2 * 2 * 2  # steps x grad_accum x batch_size x processes


def test_in_memory_streams_beside_shards_are_split_by_record(tiny, tmp_path):
    _, processor = tiny
    write_webdataset(tmp_path / "wds", 2, 4)
    streams = [{"source": str(tmp_path / "wds"), "shuffle_buffer": 4}, {"source": "easy_vqa_captions"}]
    data = DataConfig(streams=streams, seq_len=48, max_records=10)
    parts = [build_data(data, processor, batch_size=2, seed=0, rank=r, world_size=2)[0] for r in range(2)]
    held = [{r.id for r in p.streams[1].records} for p in parts]
    assert len(held[0]) == len(held[1]) == 5 and not held[0] & held[1]
    for p in parts:
        p.take(3)


def test_parquet_shards_need_a_kind(tmp_path):
    write_parquet(tmp_path / "pq", 1, 2)
    cfg = {
        "model": {"decoder": {"model_type": "llama"}, "tokenizer": "t"},
        "data": {"streams": [{"source": str(tmp_path / "pq")}]},
    }
    with pytest.raises(ConfigError, match="kind: say which kind"):
        config_from_dict(cfg)
