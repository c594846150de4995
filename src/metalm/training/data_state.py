"""Resuming a :class:`~metalm.training.data.DataStream`: its state is global (the plan's counters, the records
found bad, the skip report), so a checkpoint taken with one number of processes resumes with another."""

from __future__ import annotations

import copy
from typing import Any

from metalm.data.records import RecordError, SkipReport

__all__ = ["STATE_VERSION", "DataStreamState"]

# 3: a text window in progress is pieces of documents (2: its token ids; still read); 2: one global
# state for all processes (1 was per rank).
STATE_VERSION = 3


class DataStreamState:
    """The resume half of :class:`~metalm.training.data.DataStream` (it reads the stream's plan, streams,
    counts and report)."""

    def local_tally(self) -> dict[str, Any]:
        """What this process found while building (counts, bad records): for
        :meth:`state_dict`'s ``peers`` on the process that saves the state."""
        return {
            "counts": dict(self.counts),
            "bad": {s.name: sorted(s.bad) for s in self.streams},
            "report": [list(i) for i in self.report.items],
        }

    def state_dict(self, peers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """JSON-ready state of the global sequence; `load_state_dict` on a stream built from the same
        records resumes exactly, with any number of processes. The plan's position is the same on every
        rank; what building found differs per rank: `peers` are the other ranks' :meth:`local_tally`, to
        count and list their finds too."""
        stats = self.stats
        bad = {s.name: set(s.bad) for s in self.streams}
        report = SkipReport(self.report.count, list(self.report.items), self.report.max_items)
        for peer in peers or []:
            for key, n in peer["counts"].items():
                stats[key] = stats.get(key, 0) + n
            for name, idxs in peer["bad"].items():
                bad[name] |= set(idxs)
            for item in peer["report"]:
                if tuple(item) not in report.items:
                    report.add(RecordError(item[3], path=item[0], line=item[1], field=item[2]))
        plan = self.plan.state()
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "batch_sizes": dict(self.batch_sizes),
            "world_size": self.world_size,
            "mix": self.mix,
            "draws": plan["draws"],
            "stats": stats,
            "per_stream": plan["per_stream"],
            "streams": {name: {**walk, "bad": sorted(bad[name])} for name, walk in plan["walks"].items()},
            "skip_report": {"count": report.count, "items": [list(i) for i in report.items]},
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue the sequence where `state` left it. The state is global, so the number of processes
        may change; with ``strict`` the global micro-batch (``batch_size * world_size``) must stay the same
        (2 × 8 → 1 × 16 or 4 × 4), so the batch sequence continues exactly as it would have. With
        ``strict=False`` another global micro-batch is accepted: the *sample* sequence continues without
        duplicates or gaps, cut into batches of the new size."""
        state = copy.deepcopy(state)
        if state.get("version") == 2:
            state = self._upgrade_v2(state)
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"unsupported data state version {state.get('version')!r} (this version reads {STATE_VERSION})"
            )
        for key in ("seed", "mix", "split"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data state was saved with {key}={state[key]!r}, this run has {getattr(self, key)!r}; "
                    "resume with the same settings"
                )
        saved = state["batch_size"] * state["world_size"]
        saved_streams = state.get("batch_sizes", {})  # a state from before streams had batch sizes: none
        if strict and saved_streams != self.batch_sizes:
            raise ValueError(
                f"data state was saved with streams' own batch sizes {saved_streams}, this run has "
                f"{self.batch_sizes}; keep them to continue the same batches"
            )
        if strict and saved != self.batch_size * self.world_size:
            raise ValueError(
                f"data state was saved with a global micro-batch of {saved} samples (batch_size "
                f"{state['batch_size']} x world_size {state['world_size']}), this run has "
                f"{self.batch_size * self.world_size} (batch_size {self.batch_size} x world_size "
                f"{self.world_size}); keep batch_size x world_size the same to continue the same batches"
            )
        if sorted(state["streams"]) != sorted(self.names):
            raise ValueError(
                f"data state has streams {sorted(state['streams'])}, this run has {sorted(self.names)}"
            )
        stats = state["stats"]
        walks = {name: {k: v for k, v in s.items() if k != "bad"} for name, s in state["streams"].items()}
        self.plan.load(
            {
                "draws": state["draws"],
                "samples": stats["samples"],
                "batches": stats["batches"],
                "per_stream": state["per_stream"],
                "walks": walks,
            }
        )
        self.base_counts = {k: v for k, v in stats.items() if k not in ("samples", "batches")}
        self.counts = {}
        for s in self.streams:
            s.bad = set(state["streams"][s.name]["bad"])
        self.reported = {(s.name, i) for s in self.streams for i in s.bad}
        self.report.count = state["skip_report"]["count"]
        self.report.items = [tuple(i) for i in state["skip_report"]["items"]]

    def _upgrade_v2(self, state: dict[str, Any]) -> dict[str, Any]:
        """A version-2 state (a packer holding token ids) as version 3 (pieces of documents). A v2 packer
        that holds tokens always holds whole document ends: a document still in progress means the buffer
        was just emitted, empty."""
        for name, s in state["streams"].items():
            stream = self.streams[self.names.index(name)] if name in self.names else None
            packer = s.pop("packer")
            pieces = []
            for doc, (a, b) in zip(packer["docs"], packer["ranges"]):
                n = len(stream._text_ids(doc)) if stream is not None else b - a
                pieces.append([doc, n - (b - a), n])
            s["pieces"] = pieces
        state["version"] = STATE_VERSION
        return state
