"""`make demo`'s script: it ends on the search page, Ctrl-C stops it, and the commands it
prints work pasted into a new shell (an empty environment: no venv on PATH, nothing
exported). The pipeline itself (about 5 minutes, most of it training) is measured in
docs/BENCHMARKS.md, not run here; the world it serves is the search page tests' one."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ui_world import World, build_world, free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "demo.sh"
BIN = Path(sys.executable).parent  # the project's venv: what `make` puts on PATH
BARE = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, compact_model: Path) -> World:
    return build_world(tmp_path_factory.mktemp("demo-world"), compact_model)


def _script(args: list[str], data: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**BARE, "PATH": f"{BIN}:{BARE['PATH']}", "CARSEARCH_DATA_DIR": str(data),
           "DEMO_PORT": str(port), "CARSEARCH_THREADS__TORCH": "1"}
    with log.open("wb") as fh:
        return subprocess.Popen(["bash", str(SCRIPT), *args], cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def page(world: World, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    port = free_port()
    log = tmp_path / "demo.log"
    proc = _script(["--serve-only"], world.data_dir, port, log)
    try:
        yield proc, log, port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ctrl_c_while_the_page_starts_is_a_normal_stop(
        page: tuple[subprocess.Popen[bytes], Path, int]) -> None:
    # The moment Gradio's launch begins (the page logs it just before), not after it
    # answers: the window in which Ctrl-C once ended the demo with status 130.
    proc, log, _port = page
    deadline = time.monotonic() + 240
    while "search page on http" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()


def test_the_demo_ends_on_the_page_ctrl_c_stops_it_and_its_commands_work(
        page: tuple[subprocess.Popen[bytes], Path, int], world: World, tmp_path: Path) -> None:
    """(One page start for both: the demo ends on the page and Ctrl-C stops it with status
    0; the commands it printed then work pasted into a new shell.)"""
    proc, log, port = page
    wait_for(f"http://127.0.0.1:{port}/gradio_api/info", proc, log)
    out = log.read_text()
    assert f"open http://127.0.0.1:{port} (Ctrl-C stops it)" in out
    assert "again later: make serve" in out
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    printed = re.search(r"\(or: (.+)\)$", log.read_text(), flags=re.M)
    assert printed is not None
    command = printed.group(1)
    assert str(BIN / "carsearch") in command  # by its path: no PATH needed
    again = free_port()
    command = command.replace(f"--port {port}", f"--port {again}")
    relog = tmp_path / "again.log"
    with relog.open("wb") as fh:  # pasted into a shell that has nothing set
        second = subprocess.Popen(["env", "-i", f"PATH={BARE['PATH']}", f"HOME={BARE['HOME']}",
                                   "bash", "-c", command], stdout=fh, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{again}/gradio_api/info", second, relog)
    finally:
        os.killpg(second.pid, signal.SIGINT)
        second.wait(timeout=60)
    # The CLI line the pipeline prints at its end has the same shape; it answers too, and
    # the design's example query comes back with a full page.
    search = (f"CARSEARCH_DATA_DIR={shlex.quote(str(world.data_dir))} "
              f"{BIN / 'carsearch'} search 'older model mercedes coupe' --k 5 --json")
    done = subprocess.run(["env", "-i", f"PATH={BARE['PATH']}", f"HOME={BARE['HOME']}",
                           "bash", "-c", search], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(done.stdout)
    assert len(res["hits"]) == 5 and res["hits"][0]["make"] == "Mercedes-Benz"
    assert res["relaxed"].startswith("no Mercedes-Benz coupe")
    assert "CARSEARCH_DATA_DIR=%s %s search" in SCRIPT.read_text()  # the same shape


def test_serve_without_demo_data_says_what_to_run(tmp_path: Path) -> None:
    proc = _script(["--serve-only"], tmp_path / "nothing", free_port(), tmp_path / "log")
    assert proc.wait(timeout=60) == 1
    assert "run `make demo` first" in (tmp_path / "log").read_text()
    bad = _script(["--nope"], tmp_path / "nothing", free_port(), tmp_path / "log2")
    assert bad.wait(timeout=60) == 2 and "usage:" in (tmp_path / "log2").read_text()


def test_make_serve_and_demo_args_exist() -> None:
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^serve: .*\n\t.*demo\.sh --serve-only", make, flags=re.M)
    assert re.search(r"^demo: .*\n\t.*demo\.sh \$\(DEMO_ARGS\)", make, flags=re.M)


def test_the_demo_trains_the_pretrained_base_in_two_stages_on_served_framings() -> None:
    """The pipeline's recipe (measured in docs/BENCHMARKS.md): the compact pretrained base,
    stage 1 then LoRA, on views from the box to the whole frame; it prints the served
    view; box-less whole frames are measured on request in a collection of their own."""
    script = SCRIPT.read_text()
    assert "carsearch base build --kind pretrained" in script
    assert "--kind siglip-random" not in script
    train = script[script.index("carsearch train "):].split("\n\n")[0]
    assert "--stage1-steps" in train and "--train-views box-to-frame" in train
    assert "--promote" in train
    assert "carsearch evaluate --served\n" in script
    assert "--no-box" in script and "evaluate --served --collection whole" in script
    inbox = (REPO / "scripts" / "demo_inbox.py").read_text()
    assert "--no-box" in inbox
