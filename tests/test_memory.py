"""glibc malloc tuning for batch work (platform/memory.py): freed batch-sized buffers
stay in the process, so the next batch does not fault its pages in again. Tensors as
torch allocates them (numpy asks the kernel for huge pages, which hides the effect)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
from carsearch.platform.memory import keep_freed_memory
tuned = keep_freed_memory()  # first, as the carsearch command does
import torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # the first batches lay the heap out (faulted in either way)
    torch.ones(25_000_000, dtype=torch.float64).sum()
before = faults()
for _ in range(10):  # what a loop of batches does: allocate 200 MB, touch, free
    torch.ones(25_000_000, dtype=torch.float64).sum()
print(json.dumps({"tuned": tuned, "faults": faults() - before}))
"""


def _probe(**env: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env={**os.environ, **env}, check=True)
    out: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_batch_buffers_are_reused_without_page_faults() -> None:
    tuned, plain = _probe(), _probe(CARSEARCH_MALLOC_TUNING="0")
    assert tuned["tuned"] is True and plain["tuned"] is False
    # 10 x 200 MB = 490k pages faulted in again without the tuning; with it, the heap
    # keeps them (measured: none, or up to two batches' while the heap settles)
    pages = 10 * 25_000_000 * 8 // 4096
    assert int(plain["faults"]) > pages // 2  # type: ignore[call-overload]
    assert int(tuned["faults"]) < pages // 3  # type: ignore[call-overload]


def test_the_carsearch_command_tunes_malloc_before_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import carsearch.cli as cli
    import carsearch.platform.memory as memory

    calls: list[str] = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append("tuned") or True)
    monkeypatch.setattr(cli, "app", lambda: calls.append("ran"))
    cli.main()
    assert calls == ["tuned", "ran"]
