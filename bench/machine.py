"""What a benchmark table must name: the machine it ran on; and the photos the encoder
benchmarks embed."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_line() -> str:
    """"AMD EPYC, 2 logical CPUs, load 0.4": the CPU, its size and how busy it was."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs, load average {load:.1f}"


def sample_photos(n: int) -> tuple[list[Any], str]:
    """``n`` Stanford Cars training photos (CARSEARCH_STANFORD_ROOT, else ../shared), or as
    many synthetic 320×240 images where there are too few, and which they are."""
    import numpy as np
    from PIL import Image

    env = os.environ.get("CARSEARCH_STANFORD_ROOT")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "stanford_cars"
    files = sorted((root / "cars_train").glob("*.jpg"))[:n]
    if len(files) == n:
        images = []
        for f in files:
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
        return images, "Stanford Cars photos"
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(n)]
    return [Image.fromarray(a, "RGB") for a in noise], "synthetic 320×240 images"


def wait_until_idle(max_rate: float = 0.15, window_s: float = 2.0,
                    timeout_s: float = 900.0) -> float:
    """Block until this process uses less than ``max_rate`` of a CPU over ``window_s``
    (background work done: Milvus Lite builds a collection's HNSW index in a thread of
    this process after a flush, a whole core for minutes at 100k rows), or until
    ``timeout_s``; returns the seconds waited. A timing taken before would share the
    machine with that build."""
    import time

    t_start = time.perf_counter()
    while time.perf_counter() - t_start < timeout_s:
        c0, t0 = time.process_time(), time.perf_counter()
        time.sleep(window_s)
        if (time.process_time() - c0) / (time.perf_counter() - t0) < max_rate:
            break
    return time.perf_counter() - t_start
