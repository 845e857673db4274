"""The layout keeps its promises: imports flow one way, every package says what it owns
and may import, the CLI starts without heavy libraries, thread settings take effect in a
fresh process, migrations come with an installed package, and the platform runs on the
VectorStore Protocol's second implementation."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.common import REPO

SRC = REPO / "src" / "carsearch"

# What each package may import (besides itself and third-party libraries).
ALLOWED = {
    "platform": set(),
    "data": {"platform"},
    "training": {"platform", "data"},
    "lifecycle": {"platform", "data", "ingest", "training"},
    "monitoring": {"platform"},
    "ingest": {"platform"},
    "ui": {"platform", "client"},
    "backup": {"platform"},
    "client": set(),
}
HEAVY = ("torch", "transformers", "faiss", "pymilvus", "milvus_lite", "gradio", "peft",
         "accelerate", "alembic", "PIL", "scipy")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {m for m in out if m.startswith("carsearch.")}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package: str) -> None:
    allowed = {package, *ALLOWED[package]}
    for path in (SRC / package).rglob("*.py"):
        for module in _imports(path):
            parts = module.split(".")[1:]
            ok = any(".".join(parts[:n]) in allowed for n in (1, 2))
            assert ok, f"{path.relative_to(REPO)} imports {module}"


def test_every_package_says_what_it_owns_and_may_import() -> None:
    for init in SRC.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init.relative_to(REPO)} has no owner/imports note"
    assert not (SRC / "platform" / "vector_bench.py").exists()  # benchmark code: bench/


def _fresh(code: str, **env: str) -> str:
    e = {k: v for k, v in os.environ.items() if not k.startswith("CARSEARCH_")}
    e.update(env)
    p = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_the_cli_starts_without_heavy_libraries() -> None:
    out = _fresh(
        "import sys; from typer.testing import CliRunner; from carsearch.cli import app;"
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0;"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))")
    assert out.strip() == "[]"


def test_thread_settings_size_the_pools_before_they_start(tmp_path: Path) -> None:
    """CARSEARCH_THREADS__OMP wins over an OMP_NUM_THREADS already set, and reaches FAISS's
    OpenMP pool, which sizes itself once, when FAISS is first imported."""
    code = ("from typer.testing import CliRunner; from carsearch.cli import app;"
            "r = CliRunner().invoke(app, ['db', 'current']); assert r.exit_code == 0, r.output;"
            "import faiss, os; print(faiss.omp_get_max_threads(), os.environ['OMP_NUM_THREADS'])")
    out = _fresh(code, CARSEARCH_THREADS__OMP="3", OMP_NUM_THREADS="1",
                 CARSEARCH_DATA_DIR=str(tmp_path))
    assert out.split() == ["3", "3"]
    out = _fresh(code, OMP_NUM_THREADS="2", CARSEARCH_DATA_DIR=str(tmp_path))
    assert out.split() == ["2", "2"]  # not set: the environment's is kept


@pytest.mark.slow
def test_an_installed_package_migrates_from_any_directory(tmp_path: Path) -> None:
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    assert (target / "carsearch" / "migrations" / "env.py").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARSEARCH_")}
    env.update(PYTHONPATH=str(target), CARSEARCH_DATA_DIR=str(tmp_path / "data"))
    run = [sys.executable, "-m", "carsearch.cli"]
    p = subprocess.run([*run, "db", "upgrade"], env=env, cwd=elsewhere, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-c", "import carsearch; print(carsearch.__file__)"],
                       env=env, cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert p.stdout.startswith(str(target)), p.stdout  # the installed copy, not the checkout
    p = subprocess.run([*run, "db", "current"], env=env, cwd=elsewhere, capture_output=True,
                       text=True, timeout=120)
    current, head = (ln.split()[-1] for ln in p.stdout.splitlines())
    assert current == head


def test_the_platform_runs_on_the_second_store_implementation(
    tmp_path: Path, compact_model: Path
) -> None:
    """Ingest, search, promotion with re-indexing and reconcile on the in-memory
    ExactStore: nothing in the platform reaches past the VectorStore Protocol."""
    from carsearch.ingest.worker import IngestWorker
    from carsearch.lifecycle.reconcile import reconcile
    from carsearch.lifecycle.reindex import promote_with_backfill
    from carsearch.platform.db import migrate
    from carsearch.platform.db.images import indexed_ids
    from carsearch.platform.runtime import Platform
    from carsearch.platform.settings import Settings
    from carsearch.platform.vectors.memory import ExactStore
    from ingest_world import make_image

    # settle 0: the whole delivery is there at once (the sidecar comes after its image)
    settings = Settings(data_dir=tmp_path / "data", ingest={"settle_s": 0.0})
    settings.ensure_dirs()
    migrate.upgrade(settings.database_url)
    p = Platform(settings, store=ExactStore())
    p.registry.publish(compact_model, name="v1")
    promote_with_backfill(p, "v1", progress=False)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(5):
        make_image(inbox / f"c{i}.png", i)
    (inbox / "c0.png.json").write_text(json.dumps({"make": "Ford", "colour": "red"}))
    assert IngestWorker(p, inbox=inbox).run_once().summary.indexed == 5
    hits = p.search.search_text("red ford", k=5).hits
    assert len(hits) == 5 and {h.make for h in hits} >= {"Ford"}
    p.registry.publish(compact_model, name="v2")
    _, report = promote_with_backfill(p, "v2", progress=False)
    assert report.embedded == 5 and p.store.alias_target() == "carsearch_v2"
    p.store.delete("carsearch_v2", sorted(indexed_ids(p.db))[:2])
    rep = reconcile(p, progress=False)
    assert (rep.missing, rep.repaired_missing) == (2, 2)
    assert p.store.ids("carsearch_v2") == indexed_ids(p.db)
    assert p.search.search_similar(hits[0].image_id, k=3).hits[0].image_id == hits[0].image_id
    p.close()


def test_the_api_client_imports_nothing_heavy() -> None:
    """`carsearch.client` is for programs that call the server: httpx and pydantic only."""
    out = _fresh("import sys; import carsearch.client;"
                 f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}),"
                 "sorted(m for m in sys.modules if m.startswith('carsearch.')))")
    assert out.strip() == ("[] ['carsearch.client', 'carsearch.client.http', "
                           "'carsearch.client.models']")
