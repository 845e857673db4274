"""Run by test_train_ddp under `accelerate launch`: one tiny training run.

    accelerate launch --cpu --num_processes 2 tests/ddp_train.py DATA BASE OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from carsearch.training.trainer import train
from train_helpers import tiny_config


def main() -> None:
    data, base, out = (Path(a) for a in sys.argv[1:4])
    torch.set_num_threads(1)
    result = train(tiny_config(data, base, out, steps=3, batch_size=8, grad_accum=2))
    if result.is_main_process:
        (out / "result.json").write_text(json.dumps({
            "losses": result.counters.losses, "num_processes": result.num_processes,
        }))


if __name__ == "__main__":
    main()
