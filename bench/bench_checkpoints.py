"""Image-embedding throughput and peak memory of the real SigLIP layouts on the CPU.

The two layouts of `carsearch.training.reference_layouts` (google/siglip-base-patch16-224
and google/siglip-so400m-patch14-384: real configs, random weights; throughput does not
depend on the weights) are built once into a temporary directory (or read from
`--base-dir` / `--so400m-dir`), then each (layout, precision) is measured in a fresh
child process, so that its peak RSS (`ru_maxrss`) is its own: loading included.

Precisions: `fp32`; `bf16`, the weights in bfloat16 (loaded with
`from_pretrained(dtype=torch.bfloat16)`, i.e. `model.to(torch.bfloat16)` without an fp32
copy first) and the pixels cast to match: half the weight memory; `autocast`, fp32 weights under
`torch.autocast("cpu", dtype=torch.bfloat16)`. Each child sets `torch.set_num_threads`
(`--threads`, 2) and encodes decoded images through the layout's own image processor
and `get_image_features`, as the Encoder does: one warm-up batch, then `--batches` timed
batches (3); images/s is the median batch's.

The batch size rule: the largest batch that fits in the memory available now, capped at
`--max-batch` (4), i.e.

    batch = clamp(floor((MemAvailable - 2 W - 2 GiB) / A), 1, max_batch)

where W is the weight bytes in the run's precision (the model plus a transient second
copy while it loads or is cast), and A the bytes one image needs in flight: twice (for
allocator slack and temporaries) e * (6 T d + 2 T m + h T^2) for one encoder layer
(residual, norm, q/k/v and attention output of T tokens of width d, the MLP's m-wide
hidden state, h attention maps of T x T), e the activation element size, plus the
image's pixels. On 24 GiB memory never binds for these two models (it allows hundreds
of images); the cap does, because on two cores throughput does not grow with the batch
(base fp32, model alone: 0.7-1.5 images/s at batches 1-16, no trend, measured under
load) while a larger batch only makes the run longer (so400m in bf16 takes over a minute
an image here; `--max-batch 2` keeps that run near 15 minutes).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_checkpoints.py
    .venv/bin/python bench/bench_checkpoints.py --layouts base --precisions fp32,bf16,autocast
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from machine import cpu_name, sample_photos

GIB = 1024**3
PRECISIONS = ("fp32", "bf16", "autocast")


def available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell how much memory is available")


def image_bytes(config: dict[str, Any], precision: str) -> int:
    """A: what one image needs in flight (see the module docstring)."""
    vision = config["vision_config"]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    d, m, h = vision["hidden_size"], vision["intermediate_size"], vision["num_attention_heads"]
    e = 4 if precision == "fp32" else 2
    layer = e * (6 * tokens * d + 2 * tokens * m + h * tokens * tokens)
    pixels = 3 * vision["image_size"] ** 2 * 4
    return 2 * layer + 2 * pixels


def weight_bytes(model_dir: Path, precision: str) -> int:
    fp32 = (model_dir / "model.safetensors").stat().st_size
    return fp32 // 2 if precision == "bf16" else fp32


def choose_batch(model_dir: Path, precision: str, max_batch: int) -> tuple[int, int]:
    """(batch, the batch memory alone would allow)."""
    config = json.loads((model_dir / "config.json").read_text())
    free = available_bytes() - 2 * weight_bytes(model_dir, precision) - 2 * GIB
    allowed = max(1, math.floor(free / image_bytes(config, precision)))
    return max(1, min(allowed, max_batch)), allowed


def rss_now() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(model_dir: Path, precision: str, batch: int, batches: int, threads: int) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import contextlib

    import torch
    from transformers import AutoImageProcessor, AutoModel

    from carsearch.platform.models.encoder import pooled_features, quiet_config_check

    torch.set_num_threads(threads)
    images, source = sample_photos(batch * (batches + 1))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    start = time.perf_counter()
    with quiet_config_check():
        # bf16: loaded straight into bfloat16 (`model.to(torch.bfloat16)` at load time).
        model = AutoModel.from_pretrained(str(model_dir), dtype=dtype).eval()
    processor = AutoImageProcessor.from_pretrained(str(model_dir))
    load_s = time.perf_counter() - start

    def encode(chunk: list[Image.Image]) -> torch.Tensor:
        pixels = processor(images=chunk, return_tensors="pt")["pixel_values"].to(dtype)
        ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast"
               else contextlib.nullcontext())
        with ctx:
            feats = pooled_features(model.get_image_features(pixel_values=pixels))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    seconds, cpu_s = [], 0.0
    with torch.inference_mode():
        for i in range(batches + 1):
            chunk = images[i * batch : (i + 1) * batch]
            t0, c0 = time.perf_counter(), time.process_time()
            out = encode(chunk)
            if i:  # the first batch is the warm-up
                seconds.append(time.perf_counter() - t0)
                cpu_s += time.process_time() - c0
            assert out.shape[0] == len(chunk) and bool(torch.isfinite(out).all())
    median = statistics.median(seconds)
    print(json.dumps({
        "precision": precision, "batch": batch, "batches": batches,
        "images_per_s": batch / median, "best_images_per_s": batch / min(seconds),
        # The CPU time this process got while timed, as a share of `threads` cores:
        # about 1.0 on an idle machine, lower where other processes took the cores.
        "cpu_share": cpu_s / (sum(seconds) * threads),
        "batch_s": seconds, "load_s": load_s,
        "rss_end_gib": rss_now() / GIB,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "source": source,
    }))


def measure(model_dir: Path, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    batch, allowed = choose_batch(model_dir, precision, args.max_batch)
    cmd = [sys.executable, __file__, "--worker", str(model_dir), "--precisions", precision,
           "--batch", str(batch), "--batches", str(args.batches), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{precision} on {model_dir} failed:\n{done.stderr[-3000:]}")
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    row["memory_allows"] = allowed
    return row


def layout_dir(name: str, args: argparse.Namespace, tmp: Path) -> Path:
    given = getattr(args, f"{name}_dir")
    if given is not None:
        return Path(given)
    from carsearch.training.reference_layouts import build_reference_layout

    return build_reference_layout(name, tmp / name, seed=0)


def parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="base,so400m")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=3, help="timed batches (median)")
    parser.add_argument("--base-dir", help="an existing base layout (else built here)")
    parser.add_argument("--so400m-dir", help="an existing so400m layout (else built here)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if any(p not in PRECISIONS for p in precisions):
        parser.error(f"precisions are {', '.join(PRECISIONS)}")
    if args.worker:
        worker(Path(args.worker), precisions[0], args.batch, args.batches, args.threads)
        return

    load_before, started = os.getloadavg()[0], time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n.strip() for n in args.layouts.split(",") if n.strip()]:
            model_dir = layout_dir(name, args, Path(tmp))
            n = parameters(model_dir)
            for precision in precisions:
                row = measure(model_dir, precision, args)
                print(f"# {name} {precision}: {row}", file=sys.stderr, flush=True)
                rows.append((name, n, row))
            if getattr(args, f"{name}_dir") is None:
                import shutil

                shutil.rmtree(model_dir, ignore_errors=True)  # 3.5 GB for so400m

    source = rows[0][2]["source"] if rows else ""
    print(f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, "
          f"{available_bytes() / GIB:.1f} GiB available; torch threads {args.threads}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"{dt.date.today().isoformat()}; inputs: {source}; median of {args.batches} "
          f"batches after one warm-up; 1-min load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after; {time.perf_counter() - started:.0f} s in all.\n")
    print("| layout | parameters | precision | batch (memory allows) | images/s (median) | "
          "s / image | best batch, images/s | CPU share | peak RSS | RSS at the end |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, r in rows:
        print(f"| {name} | {n / 1e6:.1f} M | {r['precision']} | {r['batch']} "
              f"({r['memory_allows']}) | {r['images_per_s']:.3f} | "
              f"{1 / r['images_per_s']:.2f} | {r['best_images_per_s']:.3f} | "
              f"{r['cpu_share']:.2f} | {r['peak_rss_gib']:.2f} GiB | "
              f"{r['rss_end_gib']:.2f} GiB |")


if __name__ == "__main__":
    main()
