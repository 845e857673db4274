"""Fuzzed input through the ingest line (issue 22), beside tests/test_fuzz.py: queue rows
whose payload is random JSON of any shape and depth (deeper than Python's json can
decode included), and inbox sidecars of random bytes, random JSON and odd label values.
Every round must finish (0 crashes), leave no job claimed (0 stalled claims), index the
good job and image queued beside the fuzz, and empty the inbox.

SQLite and a Milvus Lite file (the payload's shape is what is fuzzed; the queue's two
databases run in tests/test_ingest_line.py). Seeded (derandomised) hypothesis runs, so a
failure reproduces.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carsearch.ingest.pipeline import LABEL_FIELDS
from carsearch.ingest.worker import IngestWorker
from carsearch.platform.db import IngestJob, JobState, queue
from carsearch.platform.runtime import Platform
from ingest_world import PublishedModel, assert_invariant, make_image, world

FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                 st.floats(allow_nan=True), st.text(max_size=12),
                 st.sampled_from(["", "/", ".", "..", "/etc", "\x00", "\ud800", "vehicles",
                                  "🚗" * 5, "a" * 5000]))
any_json = st.recursive(leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=25)
# Deeper than Python's json can decode (RecursionError), as another system could write.
deep_text = st.integers(1, 4000).map(lambda n: "[" * n + "]" * n)
payload = st.one_of(
    any_json,
    st.fixed_dictionaries({"path": any_json}, optional={
        "meta": any_json, "source": any_json, "collection": any_json}),
    st.fixed_dictionaries({"path": st.just("/nowhere/x.png")}, optional={
        "meta": st.dictionaries(st.sampled_from((*LABEL_FIELDS, "source")), any_json),
        "source": leaf, "collection": leaf}),
    deep_text.map(lambda t: ("raw", t)),
)
sidecar = st.one_of(
    st.binary(max_size=300),
    any_json.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from((*LABEL_FIELDS, "source", "camera")), any_json,
                    max_size=6).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 30_000).map(lambda n: ("[" * n + "]" * n).encode()),
)


@pytest.fixture(scope="module")
def fz(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path,
       published_model: PublishedModel) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("fuzz-ingest")
    shutil.copyfile(sqlite_template, tmp / "db.sqlite")  # the run's migrated template
    p = world(tmp, f"sqlite:///{tmp / 'db.sqlite'}", published_model, str(tmp / "milvus.db"))
    yield p
    p.close()


def _insert(p: Platform, payloads: list[Any]) -> None:
    with p.db.session() as s:
        for value in payloads:
            raw = isinstance(value, tuple)
            job = IngestJob(kind="image", payload={"path": "x"} if raw else
                            (sa.JSON.NULL if value is None else value), state=JobState.queued)
            s.add(job)
            s.flush()
            if raw:  # JSON text as stored: too deep for Python to write
                s.execute(sa.text("UPDATE ingest_jobs SET payload = :t WHERE id = :i"),
                          {"t": value[1], "i": job.id})


_seq = [0]


@FUZZ
@given(payloads=st.lists(payload, min_size=1, max_size=5), side=sidecar,
       side_name=st.sampled_from(["{}.json", "{}.png.json"]))
def test_random_payloads_and_sidecars(fz: Platform, payloads: list[Any], side: bytes,
                                      side_name: str) -> None:
    _seq[0] += 1
    n = _seq[0]
    root = fz.settings.data_dir.parent
    inbox = root / "inbox"
    inbox.mkdir(exist_ok=True)
    _insert(fz, payloads)
    (good,) = queue.enqueue(fz.db, [{"path": str(make_image(root / f"good{n}.png", 5000 + n))}])
    (inbox / side_name.format(f"in{n}")).write_bytes(side)
    make_image(inbox / f"in{n}.png", 9000 + n)
    w = IngestWorker(fz, inbox=inbox, batch_size=4)
    w.run_once()  # 0 crashes
    with fz.db.session() as s:
        rows = s.execute(sa.select(IngestJob.id, IngestJob.state, IngestJob.last_error)).all()
    states = {i: st for i, st, _ in rows}
    errors = {i: e for i, _, e in rows}
    assert JobState.running not in states.values()  # 0 stalled claims
    assert states[good] == JobState.done, errors[good]
    assert not any(inbox.iterdir())  # the image taken in, its sidecar with it
    assert_invariant(fz)
