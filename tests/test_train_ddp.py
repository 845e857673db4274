"""Two data-parallel CPU processes (gloo) train to the same weights as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_helpers import tiny_catalogue, weights

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(processes: int, data: Path, base: Path, out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        *(["--multi_gpu"] if processes > 1 else ["--cpu"]),
        "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(HERE / "ddp_train.py"), str(data), str(base), str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_two_processes_match_one(compact_model: Path, tmp_path: Path) -> None:
    data = tiny_catalogue(tmp_path / "catalogue")
    one = _launch(1, data, compact_model, tmp_path / "one")
    two = _launch(2, data, compact_model, tmp_path / "two")
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    a, b = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    base = weights(compact_model)
    assert any(not torch.equal(base[k], a[k]) for k in a)
