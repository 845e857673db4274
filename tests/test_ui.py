"""The search page: the real Gradio server in a subprocess, driven by gradio_client.

The world is real: a compact SigLIP promoted through the Registry, generated images
ingested through the pipeline into Milvus Lite + SQLite (see ui_world.py).
"""

from __future__ import annotations

import json
import struct
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from carsearch.platform.db import (
    AnnReport,
    Database,
    DriftReport,
    Image,
    QueryFeedback,
    QueryLog,
    labels,
    migrate,
)
from carsearch.platform.errors import ConfigError
from carsearch.platform.runtime import Platform
from carsearch.platform.search.service import SearchHit
from carsearch.platform.settings import Settings
from carsearch.platform.vectors.filters import SearchFilters
from carsearch.ui.app import parse_auth
from carsearch.ui.page import caption, describe_filters
from carsearch.ui.render import evaluation_table, page_header, status_markdown

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from ui_world import CARS, Server, World, build_world, run_server  # noqa: E402

NO_FILTERS = ([], [], [], [], "any", "any")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, compact_model: Path) -> World:
    w = build_world(tmp_path_factory.mktemp("ui-world"), compact_model)
    db = Database(w.settings.database_url)
    with db.session() as s:  # what the drift job and the ANN audit would have written
        report = DriftReport(n_images=len(CARS), n_isolated=2, retrain_triggered=True)
        s.add(report)
        s.add(AnnReport(index_type="IVF_FLAT", n_queries=50, n_vectors=len(CARS),
                        recall_at_10=0.987, params={"nprobe": 16}))
        s.flush()
        report_id = report.id
        pickups = [r.id for r in s.scalars(select(Image).where(Image.body_type.in_(
            ["Regular Cab"])).order_by(Image.id))]
    labels.create_tasks(db, report_id, "vehicles", [labels.NewTask(
        pickups, "Ford F-150 Regular Cab 2007", {"make": "Ford", "body_type": "Regular Cab"})])
    db.dispose()
    return w


@pytest.fixture(scope="module")
def server(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from run_server(world, tmp_path_factory.mktemp("ui-log") / "server.log")


@pytest.fixture(scope="module")
def client(server: Server) -> Client:
    return Client(server.url, verbose=False)


def search(client: Client, query: str, k: int = 8, filters: tuple[Any, ...] = NO_FILTERS) -> Any:
    return client.predict(query, k, *filters, api_name="/search")


def captions(gallery: list[dict[str, Any]]) -> list[str]:
    return [item["caption"] for item in gallery]


def test_text_search_reads_filters_from_the_query(client: Client) -> None:
    gallery, status, _sel, _detail, chips = search(client, "red 2012 chevy pickup")
    assert set(chips["value"]) == {"colour=red", "year=2012", "make=Chevrolet", "body=pickup"}
    assert "make Chevrolet" in status and "year 2012" in status
    # One vehicle meets all four: it comes first, and the page is filled with the
    # nearest others, each saying what it does not meet, and the status says so.
    assert "only 1 red Chevrolet pickup from 2012; showing " in status
    assert len(gallery) == 8 and "Chevrolet Silverado 1500 2012" in captions(gallery)[0]
    assert " · not " not in captions(gallery)[0]
    assert all(" · not " in c for c in captions(gallery)[1:])
    # The next is the other pickup (body is kept longer than year and colour).
    assert "Ford F-150 2007" in captions(gallery)[1]
    assert "not colour: red, make: Chevrolet, year: 2012" in captions(gallery)[1]
    assert Path(gallery[0]["image"]).is_file()  # the thumbnail came back over HTTP


def test_a_query_naming_nothing_known_ranks_everything(client: Client) -> None:
    gallery, status, *_rest, chips = search(client, "something shiny", k=5)
    assert chips["value"] == [] and "filters: none" in status
    ranks = [c.split(" · ")[0] for c in captions(gallery)]
    assert ranks == ["#1", "#2", "#3", "#4", "#5"]
    scores = [float(c.split(" · ")[1]) for c in captions(gallery)]
    assert scores == sorted(scores, reverse=True)


def test_removing_a_chip_widens_the_search(client: Client) -> None:
    search(client, "red 2012 chevy pickup")
    gallery, status, *_ = client.predict(
        "red 2012 chevy pickup", ["year=2012"], 8, *NO_FILTERS, api_name="/refine"
    )
    n_2012 = sum(1 for _c, _col, _s in CARS if _c.endswith("2012"))
    # Every 2012 vehicle first, met exactly; then the rest to fill the page.
    assert all("2012" in c and " · not " not in c for c in captions(gallery)[:n_2012])
    assert all(" · not year: 2012 · " in c for c in captions(gallery)[n_2012:])
    assert len(gallery) == 8
    assert "make" not in status.split("filters:")[1].split("·")[0]


def test_picked_filters_apply_and_override_the_query(client: Client) -> None:
    gallery, status, *_ = search(client, "chevy", filters=(["BMW"], [], [], [], "any", "any"))
    assert gallery and all(" BMW " in f" {c} " for c in captions(gallery))
    assert "filters: make BMW" in status
    gallery, *_ = search(client, "a car", filters=([], ["coupe", "sedan"], [], ["stanford"],
                                                   "2010", "2012"))
    assert {c.split(" · ")[3] for c in captions(gallery)} == {"Coupe", "Sedan"}


def test_image_search_finds_the_same_photo_first(client: Client, world: World) -> None:
    gallery, status, *_ = client.predict(
        handle_file(str(world.photos[2])), 3, *NO_FILTERS, api_name="/image_search"
    )
    assert "image query" in status
    assert "BMW M3 2012" in captions(gallery)[0]
    assert float(captions(gallery)[0].split(" · ")[1]) > 0.99


def test_more_like_this_and_feedback(client: Client, world: World) -> None:
    db = Database(world.settings.database_url)
    try:
        with db.session() as s:
            before = len(s.scalars(select(QueryLog)).all())
        search(client, "white convertible", k=4)
        with db.session() as s:
            target = s.scalars(select(QueryLog).order_by(QueryLog.id.desc())).first()
        assert target is not None and target.query == "white convertible"
        image_id = target.result_ids[0]
        status = client.predict(str(image_id), "white convertible", api_name="/vote_up")
        assert "thumbs-up saved" in status
        gallery, status, *_ = client.predict(str(image_id), 4, *NO_FILTERS,
                                             api_name="/more_like_this")
        assert "image query" in status and float(captions(gallery)[0].split(" · ")[1]) > 0.99
        with db.session() as s:
            fb = s.scalars(select(QueryFeedback)).all()
            logs = s.scalars(select(QueryLog)).all()
        assert [(f.image_id, f.vote, f.query_log_id, f.query) for f in fb] == [
            (image_id, 1, target.id, "white convertible")
        ]
        assert len(logs) == before + 2  # every query is logged, image queries too
    finally:
        db.dispose()


def _png_bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF
        )

    ihdr = struct.pack(">IIBBBBB", 60_000, 60_000, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("empty", "empty query"),
        ("long", "query too long"),
        ("unknown-filter", "unknown make 'Zonda'"),
        ("bad-year", "year from must be a year"),
        ("not-an-image", "upload rejected: not-an-image"),
        ("bomb", "upload rejected:"),
        ("no-selection", "select a result first"),
    ],
)
def test_bad_input_gets_a_clear_message_and_the_server_stays_up(
    client: Client, tmp_path: Path, kind: str, expected: str
) -> None:
    if kind == "empty":
        out = search(client, "   ")
    elif kind == "long":
        out = search(client, "red chevy " * 1000)
    elif kind == "unknown-filter":
        out = search(client, "a car", filters=(["Zonda"], [], [], [], "any", "any"))
    elif kind == "bad-year":
        out = search(client, "a car", filters=([], [], [], [], "last year", "any"))
    elif kind == "no-selection":
        out = client.predict("", 4, *NO_FILTERS, api_name="/more_like_this")
    else:
        f = tmp_path / "upload.png"
        f.write_bytes(b"this is not a picture" if kind == "not-an-image" else _png_bomb())
        out = client.predict(handle_file(str(f)), 4, *NO_FILTERS, api_name="/image_search")
    gallery, status = out[0], out[1]
    assert gallery == [] and status.startswith("**Error:**") and expected in status
    if kind == "bomb":
        assert "decompression-bomb" in status or "too-many-pixels" in status
    gallery, status, *_ = search(client, "blue ford", k=2)  # still serving
    assert gallery and "Error" not in status


def test_header_status_and_evaluation_tabs(client: Client) -> None:
    header, *_choices = client.predict(api_name="/page_info")
    assert "Serving model **base**" in header and f"index size **{len(CARS)}**" in header
    status = client.predict(api_name="/status")
    assert "### Ingest queue" in status and "| base | serving |" in status
    drift = status.split("### Last drift report")[1].split("###")[0]
    assert "| 8 | 2 | yes |" in drift
    ann = status.split("### Latest ANN audit")[1].split("###")[0]
    assert "IVF_FLAT" in ann and "0.9870" in ann
    # The page serves from the search mirror, built in the background when it started.
    deadline = time.monotonic() + 30
    while "search: in-memory mirror (exact, 8 vectors)" not in status:
        assert time.monotonic() < deadline, status.split("### Ingest queue")[0]
        time.sleep(0.5)
        status = client.predict(api_name="/status")
    note, table = client.predict(api_name="/evaluation")
    assert "model version base" in note
    assert table["headers"][:3] == ["model", "Recall@1", "Recall@5"]
    assert table["data"][0][0] == "base (serving)" and table["data"][1][0] == "zero-shot base"


def test_the_evaluation_tab_shows_and_runs_the_served_view(client: Client) -> None:
    """Nothing stored at first; the button measures the serving version through the
    index (every class name and a held-out phrasing; 8 images, one per class), keeps the
    result with the version, and the tab shows it again on the next load."""
    first = client.predict(api_name="/served_evaluation")
    assert "No served evaluation of version **base** yet" in first
    shown = client.predict(api_name="/run_served_evaluation")
    assert "**Served view** of version **base**" in shown
    assert "8 indexed images, each query asks for 8 hits" in shown
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in shown.splitlines()
            if ln.startswith("| ") and "---" not in ln}
    names = rows["class names"].split(" | ")
    assert names[1] == "8"  # one query per class
    # every image comes back, so each class's one image is within the top 10
    assert names[4] == "1.000 [1.00, 1.00]"
    assert " [" in names[2] and " [" in names[5]  # R@1 and mAP carry their intervals
    assert "pairs)" in names[7]  # the ECE of the page's probability, over 8 x 8 pairs
    assert rows["chance (class names)"].split(" | ")[2] == "0.125"  # 1 relevant of 8
    assert "held-out phrasings" in rows
    again = client.predict(api_name="/served_evaluation")
    assert again == shown


def test_only_thumbnails_and_uploads_are_served(server: Server, world: World) -> None:
    for secret in (Path(world.settings.database_url.removeprefix("sqlite:///")),
                   world.photos[0], Path(__file__)):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{server.url}gradio_api/file={secret}", timeout=10)
        assert err.value.code == 403
    thumbs = sorted((world.settings.image_dir / "_thumbs").rglob("*.jpg"))
    assert thumbs
    with urllib.request.urlopen(f"{server.url}gradio_api/file={thumbs[0]}", timeout=10) as r:
        assert r.status == 200 and r.read(3) == b"\xff\xd8\xff"


def test_status_without_any_reports(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "empty")
    migrate.upgrade(settings.database_url)
    plat = Platform(settings)
    try:
        text = status_markdown(plat)
        assert "### Last drift report\n\nno report yet" in text
        assert "### Latest ANN audit\n\nno report yet" in text
        assert "version **none**" in text and "none published" in text
        assert "No serving model version" in page_header(plat)
        assert evaluation_table(plat) == (
            "No evaluation results yet (train and evaluate a model first).", None
        )
    finally:
        plat.close()


def test_status_shows_the_flywheel(tmp_path: Path) -> None:
    """Drift events with their labelling tasks and retrain, and each training run's
    outcome: promoted, kept as a candidate and why, failed."""
    from carsearch.platform.db import RunStatus, TrainingRun

    settings = Settings(data_dir=tmp_path / "fly")
    migrate.upgrade(settings.database_url)
    plat = Platform(settings)
    try:
        assert "no drift events yet" in status_markdown(plat)
        with plat.db.session() as s:
            s.add(DriftReport(n_images=40, n_isolated=1, retrain_triggered=True,
                              report={"label_tasks": [1], "retrain": {"state": "exited 0"}}))
            s.add(TrainingRun(base_model="b", status=RunStatus.finished, metrics={
                "outcome": {"promote_asked": True, "promoted": False,
                            "reason": "mAP 0.41 is below serving v1 (0.52)"}}))
            s.add(TrainingRun(base_model="b", status=RunStatus.finished, metrics={
                "outcome": {"promote_asked": True, "promoted": True,
                            "reason": "mAP 0.61 beats serving v1 (0.52)"}}))
            s.add(TrainingRun(base_model="b", status=RunStatus.failed, error="OSError: disk"))
        assert "no retrain requests yet" in status_markdown(plat)
        from carsearch.platform.db import retrains

        rid, _ = retrains.by_person(plat.db, "vehicles", "ann (cli)")
        claimed = retrains.claim(plat.db, "page")
        assert claimed is not None
        retrains.finish(plat.db, claimed, retrains.CANDIDATE, "kept v9 as a candidate: "
                        "mAP 0.40 is below serving v1 (0.52)", version="v9")
        text = status_markdown(plat)
        flywheel = text.split("### Data flywheel")[1].split("### Latest ANN audit")[0]
        assert "Labelling tasks: 0 open, 0 done" in flywheel
        assert "| 1 |" in flywheel and "exited 0" in flywheel
        assert "kept as candidate: mAP 0.41 is below serving v1 (0.52)" in flywheel
        assert "promoted: mAP 0.61 beats serving v1 (0.52)" in flywheel
        assert "failed: OSError: disk" in flywheel
        assert (f"| {rid} | ann (cli) | candidate | v9 | kept v9 as a candidate: mAP 0.40 "
                "is below serving v1 (0.52) |") in flywheel
        order = [flywheel.index(w) for w in ("failed:", "promoted:", "kept as candidate")]
        assert order == sorted(order)  # newest first
    finally:
        plat.close()


def test_status_shows_the_last_drift_check_behind_newer_idle_runs(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "drift")
    migrate.upgrade(settings.database_url)
    plat = Platform(settings)
    try:
        with plat.db.session() as s:
            s.add(DriftReport(n_images=40, n_isolated=1, retrain_triggered=True,
                              report={"status": "checked"}))
            s.add(DriftReport(n_images=3, report={"status": "too_few_new"}))
            s.add(DriftReport(n_images=0, report={"status": "too_few_new"}))
        drift = status_markdown(plat).split("### Last drift report")[1].split("###")[0]
        lines = [ln for ln in drift.splitlines() if ln.startswith("| ") and "---" not in ln]
        assert "| too_few_new | 0 | 0 | no |" in lines[1]  # the newest run first
        assert "| checked | 40 | 1 | yes |" in lines[2]  # then the last real check
        assert len(lines) == 3
    finally:
        plat.close()


def test_evaluation_falls_back_to_the_newest_results_file(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d")
    migrate.upgrade(settings.database_url)
    run = settings.data_dir / "runs" / "20260101-000000"
    run.mkdir(parents=True)
    (run / "evaluation_results.json").write_text(json.dumps({
        "split": "test",
        "models": {"zero_shot": {"model": "base", "Recall@1": 0.1, "mAP": 0.2},
                   "fine_tuned": {"model": "out", "Recall@1": 0.3, "mAP": 0.4, "MRR": 0.5}},
    }))
    plat = Platform(settings)
    try:
        note, table = evaluation_table(plat)
    finally:
        plat.close()
    assert "evaluation_results.json" in note
    assert table == {"headers": ["model", "Recall@1", "mAP", "MRR"],
                     "data": [["zero_shot", 0.1, 0.2, None], ["fine_tuned", 0.3, 0.4, 0.5]]}


# -- small pure parts --------------------------------------------------------------------
def test_auth_setting_is_parsed_strictly() -> None:
    assert parse_auth(None) is None and parse_auth("") is None
    assert parse_auth("ann:s3cr:et") == ("ann", "s3cr:et")
    for bad in ("ann", ":pw", "ann:"):
        with pytest.raises(ConfigError, match="user:password"):
            parse_auth(bad)


def test_captions_and_filter_descriptions() -> None:
    hit = SearchHit(rank=2, score=0.81234, image_id=5, path="/x", make="Ford", model="F-150",
                    year=2007, body_type="Regular Cab", colour=None, source="stanford")
    assert caption(hit) == (
        "#2 · 0.812 · Ford F-150 2007 · Regular Cab · colour ? · stanford · whole frame")
    boxed = SearchHit(rank=1, score=0.5, image_id=6, path="/y", box=[3, 4, 90, 60])
    assert caption(boxed).endswith("· box 3,4,90,60")
    assert describe_filters(SearchFilters()) == "none"
    assert describe_filters(SearchFilters(make=("Ford", "BMW"), year_min=2008)) == (
        "make Ford / BMW, years 2008–…"
    )


def test_login_is_required_when_auth_is_set(auth_server: Server) -> None:
    """The run's page behind a login (tests/fixtures/pages.py)."""
    with pytest.raises(Exception):  # noqa: B017 - the client raises its own error type
        Client(auth_server.url, verbose=False)
    authed = Client(auth_server.url, verbose=False, auth=("ann", "s3cret"))
    gallery, status, *_ = authed.predict("blue ford", 2, *NO_FILTERS, api_name="/search")
    assert gallery and "Error" not in status


def test_the_classify_tab(client: Client, world: World) -> None:
    out, note = client.predict(handle_file(str(world.photos[0])), "pickup, sedan, convertible",
                               "a photo of a {}.", api_name="/classify")
    probs = {c["label"]: c["confidence"] for c in out["confidences"]}
    assert set(probs) == {"pickup", "sedan", "convertible"}
    assert all(0.0 < p < 1.0 for p in probs.values())
    assert "need not sum to one" in note and f"most likely: {out['label']}" in note
    _out, note = client.predict(handle_file(str(world.photos[0])), " , ", "a photo of a {}.",
                                api_name="/classify")
    assert note.startswith("**Error:**") and "labels" in note
    _out, note = client.predict(None, "car", "a photo of a {}.", api_name="/classify")
    assert "choose an image file" in note


def test_a_second_collection_and_the_probability_cut_off(client: Client) -> None:
    """The page searches the collection picked (its own version, metadata and filters),
    and the minimum-probability slider drops text hits below it."""
    gallery, status, *_rest, chips = client.predict(
        "red pickup", 8, *NO_FILTERS, "photos", 0.0, api_name="/search")
    assert len(gallery) == 2 and chips["value"] == []  # no vehicle filters read here
    assert "collection photos" in status and "model photos-base" in status
    assert {c.split(" · ")[-1] for c in captions(gallery)} == {"a quiet street at dawn",
                                                                 "a busy market square"}
    assert all(" · by user" in c for c in captions(gallery))
    _g, status, *_ = client.predict("street", 8, ["BMW"], [], [], [], "any", "any",
                                    "photos", 0.0, api_name="/search")
    assert status.startswith("**Error:**") and "no make filter" in status

    def probabilities(gallery: list[dict[str, Any]]) -> list[float]:
        return [float(c.split(" · p=")[1].split(" · ")[0]) for c in captions(gallery)]

    every, *_ = client.predict("a car", 8, *NO_FILTERS, "vehicles", 0.0, api_name="/search")
    probs = sorted(probabilities(every), reverse=True)  # as shown: 3 significant digits
    assert len(probs) == 8
    # Cut between two neighbours that the captions tell apart (the compact model's
    # probabilities are small and close; which pair differs depends on the model built).
    gap = next(i for i in range(7) if probs[i] > probs[i + 1])
    cut = (probs[gap] + probs[gap + 1]) / 2
    kept, status, *_ = client.predict("a car", 8, *NO_FILTERS, "vehicles", cut,
                                      api_name="/search")
    assert len(kept) == gap + 1 and all(p >= probs[gap] for p in probabilities(kept))
    assert "probability ≥" in status


def test_the_label_tab_labels_a_drift_cluster(client: Client) -> None:
    """(Last: it relabels two vehicles.) The open task, its images and suggestion, a
    refused apply without a make, then one apply for the whole cluster."""
    picker = client.predict(api_name="/label_tasks")
    (choice,) = picker["choices"]
    assert choice[0].startswith("task 1: 2 to label, nearest Ford F-150 Regular Cab 2007")
    images, note, make, _model, _year, body, _colour = client.predict(
        1, api_name="/label_task")
    assert len(images) == 2 and "2 of 2 images to label" in note
    assert (make, body) == ("Ford", "Regular Cab")
    _picker, note = client.predict(1, "", "X1", "2020", "pickup", "", api_name="/label_apply")
    assert note.startswith("**Error:**") and "the make" in note
    _picker, note = client.predict(1, "Zephyr", "X1", "2020", "spaceship", "",
                                   api_name="/label_apply")
    assert note.startswith("**Error:**") and "spaceship" in note
    picker, note = client.predict(1, "Zephyr", "X1", "2020", "pickup", "red",
                                  api_name="/label_apply")
    assert note == "labelled 2 image(s) of task 1 · task done" and picker["choices"] == []
    gallery, _status, *_ = search(client, "anything", filters=(["Zephyr"], [], [], [],
                                                              "any", "any"))
    assert len(gallery) == 2 and all("Zephyr X1 2020" in c for c in captions(gallery))
