"""Building one process's training micro-batches of the quickstart data: 1 process × batch 16 against
rank 0 of 2 × batch 8 (the same global micro-batch), with and without ``skip_bad``. CPU time
(``time.process_time``) per micro-batch over the first 100 and the next 100; no model step.

    OMP_NUM_THREADS=1 python benchmarks/data_pipeline.py
"""

from __future__ import annotations

import time

import torch

from metalm.training.config import load_config
from metalm.training.data import build_data


def main() -> None:
    torch.set_num_threads(1)
    cfg = load_config("configs/quickstart.yaml")
    processor = cfg.model.to_recipe().build()[1]
    for skip_bad in (False, True):
        cfg.data.skip_bad = skip_bad
        for world, batch_size in ((1, 16), (2, 8)):
            train, _ = build_data(cfg.data, processor, batch_size=batch_size, seed=0, world_size=world)
            times = []
            for _ in range(2):
                start = time.process_time()
                train.take(100)
                times.append((time.process_time() - start) * 10)  # ms per micro-batch
            print(
                f"skip_bad={skip_bad} world={world} batch={batch_size}: "
                f"{times[0]:.1f} / {times[1]:.1f} ms CPU per micro-batch (first 100 / next 100)"
            )


if __name__ == "__main__":
    main()
