"""Query augmentation: the offline generator, the guardrail judge and resumable output,
on the real Stanford Cars labels (skipped, saying so, where the data set is absent)."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import typer

from carsearch.data.augment import (
    JudgedQuery,
    LLMVerdict,
    OfflineGenerator,
    RejectReason,
    RuleJudge,
    augment,
    judge_query,
    load_queries,
)
from carsearch.data.augment.rules import MAX_QUERY_CHARS
from carsearch.platform.vehicles import VehicleLabel, parse_class_name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def class_names(stanford_root: Path) -> list[str]:
    import scipy.io

    mat = scipy.io.loadmat(stanford_root / "cars_meta.mat")
    return [str(x[0]) for x in mat["class_names"][0]]


@pytest.fixture(scope="module")
def labels(class_names: list[str]) -> dict[str, VehicleLabel]:
    return {name: parse_class_name(name) for name in class_names}


@pytest.fixture(scope="module")
def items(class_names: list[str], stanford_root: Path) -> list[tuple[str, VehicleLabel]]:
    """The first 60 real training images as (image_id, label)."""
    import scipy.io

    annos = scipy.io.loadmat(stanford_root / "cars_train_annos.mat")["annotations"][0]
    out = []
    for row in annos[:60]:
        fname = str(row["fname"][0])
        cls = int(row["class"][0][0])
        out.append((fname.removesuffix(".jpg"), parse_class_name(class_names[cls - 1])))
    return out


def reason(label: VehicleLabel, query: str) -> RejectReason | None:
    return judge_query(label, query).reason


# ---- the offline generator -------------------------------------------------------------


def test_offline_generator_is_deterministic_per_key_not_global_random(
    labels: dict[str, VehicleLabel],
) -> None:
    label = labels["Chevrolet Silverado 1500 Extended Cab 2012"]
    a = OfflineGenerator(seed=7).generate(label, 6, key="00042")
    random.seed(123)
    OfflineGenerator(seed=7).generate(labels["Audi A5 Coupe 2012"], 6, key="x")
    b = OfflineGenerator(seed=7).generate(label, 6, key="00042")
    assert a == b
    assert len(a) == 6 and len(set(a)) == 6
    assert OfflineGenerator(seed=7).generate(label, 6, key="00043") != a
    assert OfflineGenerator(seed=8).generate(label, 6, key="00042") != a


def test_offline_queries_pass_the_judge_on_every_real_class(
    labels: dict[str, VehicleLabel],
) -> None:
    gen, judge = OfflineGenerator(seed=0), RuleJudge()
    counts: Counter[bool] = Counter()
    for i, label in enumerate(labels.values()):
        for colour in (None, "red", "silver"):
            lab = replace(label, colour=colour)
            queries = gen.generate(lab, 5, key=str(i))
            assert len(queries) == 5
            counts.update(v.accepted for v in judge.judge(lab, queries))
    assert counts[True] / sum(counts.values()) >= 0.97


def test_offline_queries_are_messy_like_people_type(labels: dict[str, VehicleLabel]) -> None:
    gen = OfflineGenerator(seed=0)
    chevy = replace(labels["Chevrolet Silverado 1500 Extended Cab 2012"], colour="red")
    merc = labels["Mercedes-Benz SL-Class Coupe 2009"]
    old = labels["Volvo 240 Sedan 1993"]
    text = {
        name: " | ".join(q for k in range(40) for q in gen.generate(lab, 5, key=str(k)))
        for name, lab in (("chevy", chevy), ("merc", merc), ("old", old))
    }
    assert "chevy" in text["chevy"] and "'12" in text["chevy"]
    assert "truck" in text["chevy"] or "pickup" in text["chevy"]
    assert "red" in text["chevy"] or "maroon" in text["chevy"]
    assert "merc " in text["merc"] and "late 2000s" in text["merc"]
    assert "older" in text["old"] or "classic" in text["old"]
    # no colour where the label has none
    assert not any(c in text["merc"].split() for c in ("red", "blue", "black", "white"))


def test_offline_typos_and_partial_queries() -> None:
    label = parse_class_name("Chevrolet Silverado 1500 Extended Cab 2012")
    clean = OfflineGenerator(seed=0, typo_rate=0.0).generate(label, 30, key="t")
    typed = OfflineGenerator(seed=0, typo_rate=1.0).generate(label, 30, key="t")
    words = {w for q in clean for w in q.lower().split()}
    assert {"silverado", "chevrolet"} <= words
    typo_words = {w for q in typed for w in q.lower().split()}
    assert not {"silverado", "chevrolet"} & typo_words
    assert any(len(q.split()) <= 2 for q in clean)  # partial information
    assert sum(q == q.lower() for q in clean) >= 0.8 * len(clean)  # mostly lower case


# ---- the guardrail judge: each rule rejects one case and passes another -----------------


def test_empty_and_over_long(labels: dict[str, VehicleLabel]) -> None:
    label = labels["Chevrolet Silverado 1500 Extended Cab 2012"]
    assert reason(label, "") is RejectReason.EMPTY
    assert reason(label, "   \t ") is RejectReason.EMPTY
    long_ok = ("chevy silverado " * 20)[:MAX_QUERY_CHARS]
    assert reason(label, long_ok) is None
    assert reason(label, long_ok + "x") is RejectReason.TOO_LONG


def test_other_make(labels: dict[str, VehicleLabel]) -> None:
    silverado = labels["Chevrolet Silverado 1500 Extended Cab 2012"]
    assert reason(silverado, "chevy silverado") is None
    assert reason(silverado, "ford silverado truck") is RejectReason.OTHER_MAKE
    assert reason(silverado, "ram 1500 pickup") is RejectReason.OTHER_MAKE
    assert reason(labels["Audi A5 Coupe 2012"], "bimmer a5") is RejectReason.OTHER_MAKE
    assert reason(labels["Audi A5 Coupe 2012"], "audi a5 coupe") is None
    # a make's alias inside the label's own name is fine
    ram = labels["Dodge Ram Pickup 3500 Crew Cab 2010"]
    assert reason(ram, "dodge ram 3500") is None
    assert reason(labels["AM General Hummer SUV 2000"], "am general hummer") is None
    # short aliases that are everyday words do not count as a make ...
    minivan = labels["Chrysler Town and Country Minivan 2012"]
    assert reason(minivan, "chrysler mini van") is None
    assert reason(labels["Honda Accord Coupe 2012"], "i am looking for a honda accord") is None
    # ... but their longer forms do
    assert reason(minivan, "mini cooper") is RejectReason.OTHER_MAKE


def test_year(labels: dict[str, VehicleLabel]) -> None:
    new = labels["Chevrolet Silverado 1500 Extended Cab 2012"]
    for ok in ("2012 silverado", "'12 silverado", "silverado \u201912", "newer silverado",
               "early 2010s chevy", "late model chevy truck"):
        assert reason(new, ok) is None, ok
    for bad in ("2007 silverado", "'07 silverado", "late 2000s silverado", "older model chevy",
                "90s chevy truck", "classic silverado"):
        assert reason(new, bad) is RejectReason.YEAR, bad
    mid = labels["Dodge Dakota Club Cab 2007"]
    assert reason(mid, "late 2000s dodge dakota") is None
    assert reason(mid, "older model dakota") is None
    assert reason(mid, "mid-2000s dakota") is RejectReason.YEAR
    assert reason(mid, "new dakota") is RejectReason.YEAR
    volvo = labels["Volvo 240 Sedan 1993"]
    assert reason(volvo, "classic volvo 240 from the early 90s") is None
    assert reason(volvo, "'93 volvo") is None
    assert reason(volvo, "2012 volvo 240") is RejectReason.YEAR
    # the label's own "Classic" is a model name, not an era claim
    classic = labels["Chevrolet Silverado 1500 Classic Extended Cab 2007"]
    assert reason(classic, "silverado classic 2007") is None
    no_year = parse_class_name("Chevrolet Corvette ZR1")
    assert reason(no_year, "corvette zr1") is None
    assert reason(no_year, "2012 corvette") is RejectReason.YEAR


def test_colour(labels: dict[str, VehicleLabel]) -> None:
    plain = labels["Chevrolet Silverado 1500 Extended Cab 2012"]
    assert reason(plain, "red chevy silverado") is RejectReason.COLOUR
    assert reason(plain, "chevy silverado") is None  # "silver" inside a word is no colour
    red = replace(plain, colour="red")
    assert reason(red, "maroon chevy truck") is None
    assert reason(red, "red silverado") is None
    assert reason(red, "blue silverado") is RejectReason.COLOUR
    assert reason(red, "pink silverado") is RejectReason.COLOUR
    grey = replace(labels["Audi A5 Coupe 2012"], colour="grey")
    assert reason(grey, "gray audi a5") is None


def test_scene(labels: dict[str, VehicleLabel]) -> None:
    label = labels["Jeep Wrangler SUV 2012"]
    assert reason(label, "jeep wrangler") is None
    for bad in ("jeep wrangler in a parking lot", "wrangler on the beach", "jeep at night",
                "wrangler in the snow", "jeep wrangler parked on the street"):
        assert reason(label, bad) is RejectReason.SCENE, bad
    assert reason(labels["GMC Terrain SUV 2012"], "gmc terrain suv") is None


def test_aftermarket(labels: dict[str, VehicleLabel]) -> None:
    label = labels["Jeep Wrangler SUV 2012"]
    for bad in ("lifted jeep wrangler", "wrangler with a lift kit", "jeep with roof rack",
                "wrangler with custom rims", "jeep wrangler tinted windows", "jeep with decals"):
        assert reason(label, bad) is RejectReason.AFTERMARKET, bad
    assert reason(label, "jeep wrangler 4x4") is None
    assert reason(labels["Plymouth Neon Coupe 1999"], "plymouth neon coupe") is None
    assert reason(labels["Honda Accord Coupe 2012"], "honda accord with neon") is (
        RejectReason.AFTERMARKET
    )


def test_llm_verdict_goes_through_the_same_schema(labels: dict[str, VehicleLabel]) -> None:
    label = labels["Honda Accord Sedan 2012"]
    yes = LLMVerdict(accepted=True)
    no = LLMVerdict(accepted=False, reason=RejectReason.SCENE, explanation="a street")
    assert judge_query(label, "honda accord", yes).accepted
    assert judge_query(label, "honda accord", no).reason is RejectReason.LLM
    # the rules win where they reject, whatever the LLM said
    assert judge_query(label, "red honda accord", yes).reason is RejectReason.COLOUR
    with pytest.raises(ValueError, match="context"):
        JudgedQuery.model_validate({"query": "honda"})


# ---- augment(): output, counts, resume ---------------------------------------------------


def _read(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_augment_writes_jsonl_and_counts(items: list[tuple[str, VehicleLabel]],
                                         tmp_path: Path) -> None:
    out = tmp_path / "q.jsonl"
    summary = augment(items, OfflineGenerator(seed=0), RuleJudge(), out, 4, progress=False)
    rows = _read(out)
    assert summary.images_done == len(items) and summary.images_skipped == 0
    assert summary.candidates == len(rows) == 4 * len(items)
    assert summary.accepted == sum(bool(r["accepted"]) for r in rows)
    assert summary.accepted + sum(summary.rejected.values()) == summary.candidates
    assert set(rows[0]) >= {"image_id", "query", "generator", "accepted", "reason"}
    assert {r["generator"] for r in rows} == {"offline"}
    assert {r["image_id"] for r in rows} == {i for i, _ in items}
    assert summary.queries_per_s > 0
    accepted = load_queries(out)
    assert sum(map(len, accepted.values())) == summary.accepted


class _WithBadCandidates:
    """The offline generator plus, for each image, a candidate each rule must reject."""

    name = "offline+bad"

    def __init__(self) -> None:
        self.inner = OfflineGenerator(seed=1)

    def generate(self, label: VehicleLabel, n: int, *, key: str = "") -> list[str]:
        good = self.inner.generate(label, n, key=key)
        bad = ["", "x" * 200, "red car", "car in a parking lot", "car with a spoiler",
               "1950 car", good[0]]
        return good + bad


def test_rejections_are_counted_by_reason(items: list[tuple[str, VehicleLabel]],
                                          tmp_path: Path) -> None:
    out = tmp_path / "q.jsonl"
    few = items[:10]
    summary = augment(few, _WithBadCandidates(), RuleJudge(), out, 3, progress=False)
    for r in (RejectReason.EMPTY, RejectReason.TOO_LONG, RejectReason.COLOUR,
              RejectReason.SCENE, RejectReason.AFTERMARKET, RejectReason.YEAR,
              RejectReason.DUPLICATE):
        assert summary.rejected[r.value] == len(few), r
    rows = _read(out)
    assert Counter(r["reason"] for r in rows if not r["accepted"]) == summary.rejected


class _Crashing:
    """Wraps a generator and raises after `limit` images, like a killed process."""

    name = "offline"

    def __init__(self, limit: int) -> None:
        self.inner = OfflineGenerator(seed=3)
        self.limit = limit
        self.calls = 0

    def generate(self, label: VehicleLabel, n: int, *, key: str = "") -> list[str]:
        self.calls += 1
        if self.calls > self.limit:
            raise KeyboardInterrupt("interrupted")
        return self.inner.generate(label, n, key=key)


def _keys(rows: Sequence[dict[str, object]]) -> list[tuple[object, object]]:
    return [(r["image_id"], r["query"]) for r in rows]


def test_resume_after_interruption_has_no_duplicates(
    items: list[tuple[str, VehicleLabel]], tmp_path: Path
) -> None:
    reference = tmp_path / "straight.jsonl"
    augment(items, OfflineGenerator(seed=3), RuleJudge(), reference, 5, progress=False)

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        augment(items, _Crashing(limit=17), RuleJudge(), out, 5, progress=False)
    assert len({r["image_id"] for r in _read(out)}) == 17
    # a crash mid-write leaves half a line behind
    with out.open("a", encoding="utf-8") as f:
        f.write('{"image_id": "00099", "query": "half a li')
    summary = augment(items, OfflineGenerator(seed=3), RuleJudge(), out, 5, progress=False)
    assert summary.images_skipped == 16  # the last image in the file is redone
    assert summary.images_done == len(items) - 16

    rows = _read(out)
    assert len(_keys(rows)) == len(set(_keys(rows)))
    assert {r["image_id"] for r in rows} == {i for i, _ in items}
    assert rows == _read(reference)

    again = augment(items, OfflineGenerator(seed=3), RuleJudge(), out, 5, progress=False)
    assert again.images_done == 1 and again.images_skipped == len(items) - 1
    assert _read(out) == _read(reference)


# ---- the command line --------------------------------------------------------------------


def _cli() -> Any:
    from carsearch.cli.augment import augment_command
    from carsearch.platform.settings import Settings

    app = typer.Typer()

    @app.callback()
    def _root(ctx: typer.Context) -> None:
        ctx.obj = Settings(data_dir=REPO / "data")

    app.command("augment")(augment_command)
    return app


def test_cli_augment_offline_on_real_data(stanford_root: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    out = tmp_path / "q.jsonl"
    args = ["augment", "--root", str(stanford_root), "--out", str(out), "--n", "3",
            "--limit", "25", "--json"]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["images_done"] == 25 and summary["candidates"] == 75
    rows = _read(out)
    assert len(rows) == 75 and len({r["image_id"] for r in rows}) == 25
    again = CliRunner().invoke(_cli(), args[:-1])
    assert again.exit_code == 0, again.output
    assert "1 done, 24 already there" in again.stdout
    assert len(_read(out)) == 75


def test_cli_rejects_unknown_generator(stanford_root: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from carsearch.platform.errors import ConfigError

    result = CliRunner().invoke(_cli(), ["augment", "--root", str(stanford_root), "--out",
                                         str(tmp_path / "q.jsonl"), "--generator", "gpt"])
    assert isinstance(result.exception, ConfigError)
    assert "--generator must be one of offline, ollama" in str(result.exception)
