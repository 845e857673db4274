"""The `carsearch` command end to end, and its one-line errors.

The behaviour runs in-process through Typer's CliRunner (the `cli` fixture); what only a
real process shows stays in subprocesses: the entry point and its verbs, one-line errors
without a trace (bad settings, an unmigrated or unreachable database), and the
interactive search reading a real stdin."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from fixtures.cli import CLI, Cli, one_line_error, run  # `env`, `cli`: tests/fixtures/cli.py

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_verb(env: dict[str, str]) -> None:
    out = run(["--help"], env).stdout
    for verb in ("db", "base", "data", "models", "ingest", "search", "augment", "train",
                 "evaluate", "serve", "reconcile", "drift", "health", "collections",
                 "label", "classify"):
        assert f" {verb} " in out
    assert " bench " not in out  # benchmark code lives under bench/ only


def test_round_trip(cli: Cli, env: dict[str, str], tmp_path: Path, compact_model: Path) -> None:
    cli(["db", "upgrade"], env)
    current = cli(["db", "current"], env).stdout.splitlines()
    assert current[0].split()[-1] == current[1].split()[-1]  # at head
    out = cli(["models", "publish", str(compact_model), "--name", "v1", "--promote"], env)
    assert "v1 is serving" in out.stdout
    listed = json.loads(cli(["models", "list", "--json"], env).stdout)
    assert [(v["name"], v["status"]) for v in listed] == [("v1", "serving")]

    rng = np.random.default_rng(0)
    rows = []
    for i, cls in enumerate(["Ford F-150 Regular Cab 2012", "BMW M3 Coupe 2012"]):
        arr = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"path": f"{i}.png", "class_name": cls}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    summary = json.loads(cli(["ingest", "manifest", str(tmp_path / "m.jsonl"), "--json"],
                             env).stdout)
    assert summary["indexed"] == 2

    res = json.loads(cli(["search", "ford pickup", "--k", "5", "--no-parse", "--json"],
                         env).stdout)
    assert res["version"] == "v1"
    assert {h["make"] for h in res["hits"]} == {"Ford", "BMW"}
    out = cli(["search", "ford pickup", "--k", "5"], env).stdout  # filters read from text
    assert "filters read from the query: make: Ford, body: pickup" in out
    # Filters read from the text are a preference: the Ford first, then the page filled.
    assert "relaxed: only 1 Ford pickup; showing the nearest vehicles" in out
    lines = [line for line in out.splitlines() if line[:4].strip().rstrip(".").isdigit()]
    assert "Ford F-150" in lines[0] and "(not" not in lines[0]
    assert "BMW M3" in lines[1] and "(not make: Ford, body: pickup)" in lines[1]
    assert re.search(r"\[id \d+\]$", lines[1])  # the id --like / --image-id take
    res = json.loads(cli(["search", "ford pickup", "--k", "5", "--json"], env).stdout)
    assert res["relaxed"] == "only 1 Ford pickup; showing the nearest vehicles"
    assert [(h["make"], h["unmet"]) for h in res["hits"]] == [
        ("Ford", []), ("BMW", ["make: Ford", "body: pickup"])]
    assert [t["hits"] for t in res["tiers"]] == [1, 0, 0, 1]
    res = json.loads(cli(["search", "truck", "--body", "pickup", "--json"], env).stdout)
    assert [h["make"] for h in res["hits"]] == ["Ford"]
    res = json.loads(cli(["search", "--image", str(tmp_path / "1.png"), "--json"], env).stdout)
    assert res["hits"][0]["make"] == "BMW"

    # Interactive: one loaded model answers every line until end of input; a refused
    # query gets its message and the next line is answered.
    typed = "ford pickup\n\n" + "x" * 5000 + "\nbmw coupe\n"
    p = subprocess.run([*CLI, "search", "--interactive", "--k", "2"], env=env, input=typed,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count(" hits in ") == 2
    assert "filters read from the query: make: Ford, body: pickup" in p.stdout
    assert "filters read from the query: make: BMW, body: coupe" in p.stdout
    assert "error: query too long" in p.stderr and "Traceback" not in p.stderr
    p = cli(["search", "-i", "--json", "--k", "1"], input="ford\nbmw\n")
    answers = [json.loads(line) for line in p.stdout.splitlines()]
    assert [a["query"] for a in answers] == ["ford", "bmw"]
    assert [a["hits"][0]["make"] for a in answers] == ["Ford", "BMW"]

    one_line_error(cli(["search", "   "], env, ok=False), "empty query")
    one_line_error(cli(["search", "car", "--make", 'x" or 1'], env, ok=False), "bad filter")
    one_line_error(cli(["models", "promote", "nope"], env, ok=False), "no model version")

    weights = next((tmp_path / "data" / "models" / "v1").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    one_line_error(cli(["search", "ford"], env, ok=False), "changed since it was published")


def test_bad_settings_are_one_line(env: dict[str, str]) -> None:
    env = dict(env, CARSEARCH_THREADS__TORCH="lots")
    one_line_error(run(["models", "list"], env, ok=False), "CARSEARCH_THREADS__TORCH")


def test_missing_model_is_one_line(cli: Cli, tmp_path: Path) -> None:
    cli(["db", "upgrade"])
    one_line_error(cli(["models", "publish", str(tmp_path / "absent")], ok=False),
                   "no model artifact")
    one_line_error(cli(["search", "red pickup"], ok=False), "no serving model version")


def test_unmigrated_database_is_one_line(env: dict[str, str]) -> None:
    one_line_error(run(["models", "list"], env, ok=False), "run `carsearch db upgrade`")
    env = dict(env, CARSEARCH_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:1/none")
    one_line_error(run(["models", "list"], env, ok=False), "cannot reach the database")


def test_model_lifecycle_moves_the_serving_alias(
    cli: Cli, env: dict[str, str], tmp_path: Path, compact_model: Path, milvus_uri: str
) -> None:
    """publish -> ingest -> promote (re-index) -> rollback -> retire --drop -> reconcile,
    each a command of its own, with the Milvus alias following the database's serving version."""
    from carsearch.platform.vectors.milvus import MilvusStore

    env = dict(env, CARSEARCH_MILVUS_URI=milvus_uri)
    cli(["db", "upgrade"], env)
    cli(["models", "publish", str(compact_model), "--name", "v1", "--promote"], env)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
        rows.append(json.dumps({"path": f"{i}.png", "class_name": "Ford F-150 Regular Cab 2012"}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    cli(["ingest", "manifest", str(tmp_path / "m.jsonl")], env)
    cli(["models", "publish", str(compact_model), "--name", "v2"], env)

    def alias() -> str | None:
        store = MilvusStore(milvus_uri)
        try:
            return store.alias_target()
        finally:
            store.close()

    assert alias() == "carsearch_v1"
    out = cli(["models", "promote", "v2"], env).stdout
    assert "v2 is serving (re-indexed 3 images" in out
    assert alias() == "carsearch_v2"
    res = json.loads(cli(["search", "ford", "--no-parse", "--json"], env).stdout)
    assert res["version"] == "v2" and len(res["hits"]) == 3
    assert "v1 is serving" in cli(["models", "rollback"], env).stdout
    assert alias() == "carsearch_v1"
    one_line_error(cli(["models", "retire", "v1"], env, ok=False), "is serving")
    out = cli(["models", "retire", "v2", "--drop"], env).stdout
    assert "v2 is retired" in out and "collection carsearch_v2" in out
    store = MilvusStore(milvus_uri)
    try:
        assert not store.has_collection("carsearch_v2")
        store.point_alias("carsearch_v1")  # pretend a crash left the alias elsewhere:
        store.ensure_collection("stray", 192)
        store.point_alias("stray")
    finally:
        store.close()
    rep = json.loads(cli(["reconcile", "--json"], env).stdout)  # ... reconcile repairs it
    assert rep["alias"] == "carsearch_v1" and rep["missing"] == rep["orphans"] == 0
    assert alias() == "carsearch_v1"
