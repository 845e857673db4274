"""Natural-language filters: phrases, years, word boundaries, validation against the DB."""

from __future__ import annotations

from pathlib import Path

import pytest

from carsearch.platform.db import Database, Image, ImageStatus, migrate
from carsearch.platform.errors import QueryError
from carsearch.platform.search.nlfilters import (
    CERTAINTY,
    FilterChip,
    FilterVocabulary,
    VocabularyCache,
    describe_chips,
    filters_from_chips,
    load_vocabulary,
    merge_filters,
    parse_query,
    relaxation_tiers,
    vague_years,
    validate_filters,
)
from carsearch.platform.vectors.filters import SearchFilters

VOCAB = FilterVocabulary(
    makes=frozenset({"Chevrolet", "Ford", "BMW", "Mercedes-Benz", "MINI", "Aston Martin",
                     "Dodge", "Ram", "Volkswagen"}),
    colours=frozenset({"red", "blue", "black", "silver", "white", "grey"}),
    bodies=frozenset({"pickup", "sedan", "coupe", "minivan", "convertible", "hatchback"}),
    sources=frozenset({"stanford", "synthetic"}),
    years=(1991, 1998, 2007, 2008, 2009, 2010, 2011, 2012),
)


def fields(q: str) -> dict[str, str]:
    return {c.field: c.value for c in parse_query(q, VOCAB).chips}


def test_the_example_query_gives_all_four_filters() -> None:
    p = parse_query("red 2012 chevy pickup", VOCAB)
    assert {c.key for c in p.chips} == {"colour=red", "year=2012", "make=Chevrolet",
                                        "body=pickup"}
    assert p.filters == SearchFilters(make=("Chevrolet",), colour=("red",), body=("pickup",),
                                      year_min=2012, year_max=2012)
    assert p.text == "red 2012 chevy pickup"  # the full text still ranks
    assert {c.label for c in p.chips} >= {"make: Chevrolet", "year: 2012"}


def test_a_query_naming_nothing_known_is_a_pure_vector_search() -> None:
    p = parse_query("something fast and shiny for the weekend", VOCAB)
    assert p.chips == () and p.filters.is_empty() and p.ignored == ()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("mercedes-benz coupe", {"make": "Mercedes-Benz", "body": "coupe"}),
        ("Mercedes Benz coupé", {"make": "Mercedes-Benz", "body": "coupe"}),
        ("a mini van for the family", {"body": "minivan"}),  # longest phrase wins
        ("dark blue vw hatch", {"colour": "blue", "make": "Volkswagen", "body": "hatchback"}),
        ("GRAY Ford F-150 truck", {"colour": "grey", "make": "Ford", "body": "pickup"}),
        ("aston martin convertible", {"make": "Aston Martin", "body": "convertible"}),
        ("chevy's pick-up", {"make": "Chevrolet", "body": "pickup"}),
    ],
)
def test_aliases_and_longest_phrases(query: str, expected: dict[str, str]) -> None:
    assert fields(query) == expected


@pytest.mark.parametrize(
    "query",
    ["I am looking for a car", "ambulance", "a smart looking car", "mini", "cheval",
     "redish minibus", "fordable", "camaro"],
)
def test_word_boundaries_and_ambiguous_words_do_not_misfire(query: str) -> None:
    assert parse_query(query, VOCAB).chips == ()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("red pickups", {"colour": "red", "body": "pickup"}),
        ("sedans from 2012", {"body": "sedan", "year": "2012"}),
        ("BMW coupes", {"make": "BMW", "body": "coupe"}),
        ("chevy minivans", {"make": "Chevrolet", "body": "minivan"}),
        ("mercedes convertibles", {"make": "Mercedes-Benz", "body": "convertible"}),
    ],
)
def test_plurals_read_as_their_singular_outside_a_negation_too(
        query: str, expected: dict[str, str]) -> None:
    """The reader of what is asked for takes plurals as the reader of negations does."""
    assert fields(query) == expected
    body = expected["body"]
    negated = parse_query(f"a car but no {body}s", VOCAB)
    assert [c.key for c in negated.exclusions] == [f"body!={body}"] and negated.chips == ()


def test_ambiguous_word_counts_next_to_an_unambiguous_one() -> None:
    assert fields("red mini") == {"colour": "red", "make": "MINI"}
    assert {c.value for c in parse_query("dodge ram", VOCAB).chips} == {"Dodge", "Ram"}


@pytest.mark.parametrize(
    ("query", "year"),
    [
        ("2012 bmw", "2012"),
        ("'12 bmw", "2012"),
        ("bmw from '98", "1998"),
        ("late 2000s sedan", "2007-2009"),
        ("early 2010s", "2010-2013"),
        ("90s bmw", "1990-1999"),
        ("2008-2012 ford", "2008-2012"),
        ("ford 2008 to 2010", "2008-2010"),
        ("between 2010 and 2008", "2008-2010"),
        ("before 2008", "-2007"),
        ("after 2010", "2011-"),
        ("since 2010", "2010-"),
        ("2009 or newer", "2009-"),
        ("2009 or older", "-2009"),
        ("2008 or 2012 silverado", "2008-2012"),
    ],
)
def test_year_forms(query: str, year: str) -> None:
    chips = [c for c in parse_query(query, VOCAB).chips if c.field == "year"]
    assert [c.value for c in chips] == [year]
    lo, hi = chips[0].year_bounds()
    f = parse_query(query, VOCAB).filters
    assert (f.year_min, f.year_max) == (lo, hi)


def test_model_numbers_are_not_years() -> None:
    assert "year" not in fields("silverado 1500 crew cab")
    assert "year" not in fields("ford f-150")


def test_values_not_in_the_database_are_dropped_with_a_note() -> None:
    p = parse_query("yellow 2015 ferrari coupe", VOCAB)
    assert [c.key for c in p.chips] == ["body=coupe"]
    assert len(p.ignored) == 3 and any("ferrari" in n for n in p.ignored)
    assert p.filters == SearchFilters(body=("coupe",))


def test_removing_chips_recomputes_the_filters() -> None:
    p = parse_query("red 2012 chevy pickup", VOCAB)
    kept = p.keep(["make=Chevrolet", "year=2012"])
    assert kept.filters == SearchFilters(make=("Chevrolet",), year_min=2012, year_max=2012)
    assert p.keep([]).filters.is_empty()
    assert filters_from_chips(kept.chips) == kept.filters


def test_picked_filters_are_validated_against_the_vocabulary() -> None:
    ok = validate_filters({"make": ["Ford"], "year_min": 2008, "year_max": None}, VOCAB)
    assert ok == SearchFilters(make=("Ford",), year_min=2008)
    with pytest.raises(QueryError, match="unknown make 'Zonda'"):
        validate_filters({"make": ["Zonda"]}, VOCAB)
    with pytest.raises(QueryError, match="unknown colour"):
        validate_filters({"colour": "mauve"}, VOCAB)
    with pytest.raises(QueryError, match="no indexed vehicle from 1950"):
        validate_filters({"year_min": 1950, "year_max": 1950}, VOCAB)
    with pytest.raises(QueryError, match="backwards"):
        validate_filters({"year_min": 2012, "year_max": 2008}, VOCAB)


def test_picked_filters_override_parsed_ones_per_field() -> None:
    parsed = SearchFilters(make=("Chevrolet",), colour=("red",), year_min=2012, year_max=2012)
    picked = SearchFilters(make=("Ford",), year_min=2008)
    assert merge_filters(parsed, picked) == SearchFilters(
        make=("Ford",), colour=("red",), year_min=2008
    )


def _row(i: int, **kw: object) -> Image:
    return Image(id=i, sha256=f"{i:064x}", path=f"/x/{i}.png", status=ImageStatus.indexed, **kw)


def test_vocabulary_comes_from_indexed_rows_and_is_cached(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    migrate.upgrade(url)
    db = Database(url)
    with db.session() as s:
        s.add(_row(1, make="Chevrolet", body_type="Regular Cab", year=2012, colour="red",
                   source="stanford"))
        s.add(_row(2, make="BMW", body_type="Coupe", year=2007, source="synthetic"))
        s.add(Image(id=3, sha256="f" * 64, path="/x/3", make="Ferrari", year=1999,
                    status=ImageStatus.quarantined))
    now = [0.0]
    cache = VocabularyCache(db, ttl_s=60, clock=lambda: now[0])
    v = cache.get()
    assert v == load_vocabulary(db)
    assert v.makes == {"Chevrolet", "BMW"} and v.bodies == {"pickup", "coupe"}
    assert v.colours == {"red"} and v.years == (2007, 2012)
    assert v.sources == {"stanford", "synthetic"}
    with db.session() as s:
        s.add(_row(4, make="Ford", year=2010, source="stanford"))
    assert "Ford" not in cache.get().makes  # still cached
    now[0] = 61.0
    assert "Ford" in cache.get().makes
    db.dispose()


def test_body_category_is_case_blind_and_keeps_unknown_types() -> None:
    from carsearch.platform.vehicles import body_category

    assert body_category("Regular Cab") == body_category("regular cab") == "pickup"
    assert body_category("Sedan") == body_category(" sedan ") == "sedan"
    assert body_category("Limousine") == "limousine"  # no category: still filterable
    assert body_category(None) == body_category("") == ""


# -- vague time words and relaxation ----------------------------------------------------
# VOCAB's 8 distinct years: a third is 3 of them, a tenth 1.
@pytest.mark.parametrize(("query", "value"), [
    ("older model mercedes coupe", "1991-2007"),
    ("old ford", "1991-2007"),
    ("an older bmw", "1991-2007"),
    ("classic chevy", "1991"),
    ("vintage vw", "1991"),
    ("newer model pickup", "2010-2012"),
    ("recent bmw", "2010-2012"),
    ("late-model ford", "2010-2012"),
    ("latest mercedes", "2012"),
])
def test_vague_time_words_are_year_ranges_of_the_collection(query: str, value: str) -> None:
    chips = [c for c in parse_query(query, VOCAB).chips if c.field == "year"]
    assert [(c.value, c.vague) for c in chips] == [(value, True)]
    assert chips[0].label.startswith(f"year: {value} (")  # the chip names its words


def test_vague_years_follow_the_years_indexed() -> None:
    assert vague_years("old", 3, [2005, 2001, 2001, 2009, 2003]) == (2001, 2003)
    assert vague_years("new", 3, [2005, 2001, 2009, 2003]) == (2005, 2009)
    assert vague_years("old", 10, list(range(1990, 2012))) == (1990, 1992)
    assert vague_years("new", 3, []) is None
    other = FilterVocabulary(makes=frozenset({"Ford"}), years=(2015, 2016, 2017))
    assert fields("older ford") == {"make": "Ford", "year": "1991-2007"}
    assert {c.field: c.value for c in parse_query("older ford", other).chips} == {
        "make": "Ford", "year": "2015"}


def test_a_stated_year_wins_over_a_vague_word_and_late_2000s_is_still_a_decade_part() -> None:
    parsed = parse_query("older 2008 ford", VOCAB)
    assert [(c.value, c.vague) for c in parsed.chips if c.field == "year"] == [("2008", False)]
    assert any("'older'" in n for n in parsed.ignored)
    assert fields("late 2000s ford")["year"] == "2007-2009"
    assert fields("2010 or older ford")["year"] == "-2010"
    assert "year" not in fields("a new ford")  # "new" alone reads nothing
    empty = FilterVocabulary(makes=frozenset({"Ford"}))
    assert "year" not in {c.field for c in parse_query("old ford", empty).chips}


def _chip(field: str, value: str, vague: bool = False) -> FilterChip:
    return FilterChip(field, value, value, vague)  # type: ignore[arg-type]


def test_relaxation_drops_the_least_certain_first() -> None:
    make, body = _chip("make", "Mercedes-Benz"), _chip("body", "coupe")
    old = _chip("year", "1991-2007", vague=True)
    assert relaxation_tiers([make, body]) == [(make, body), (make,), (body,), ()]
    tiers = relaxation_tiers([old, make, body])
    assert tiers[:4] == [(old, make, body), (make, body), (old, make), (make,)]
    assert tiers[-1] == () and len(tiers) == 8
    red, blue, year = _chip("colour", "red"), _chip("colour", "blue"), _chip("year", "2012")
    tiers = relaxation_tiers([red, blue, year])
    assert tiers == [(red, blue, year), (year,), (red, blue), ()]  # colours go together
    assert CERTAINTY == ("make", "body", "year", "colour", "vague year", "inferred")
    # A body type taken from a query image ("like this") goes before anything typed.
    like = FilterChip("body", "pickup", "like this", inferred=True)
    assert relaxation_tiers([red, like]) == [(red, like), (red,), (like,), ()]


def test_relaxed_tiers_are_described_in_words() -> None:
    make, body = _chip("make", "Mercedes-Benz"), _chip("body", "coupe")
    assert describe_chips([make, body]) == "Mercedes-Benz coupe"
    assert describe_chips([make], [body]) == "Mercedes-Benz of any body"
    assert describe_chips([body], [make]) == "coupe of any make"
    assert describe_chips([], [make, body]) == "the nearest vehicles"
    assert describe_chips([_chip("colour", "red"), _chip("year", "2005-")]) == (
        "red vehicles from 2005 on")
    assert describe_chips([_chip("year", "-2004")], [_chip("colour", "red")]) == (
        "vehicles up to 2004 of any colour")


def test_a_chip_matches_the_metadata_of_a_vehicle() -> None:
    assert _chip("body", "pickup").matches("Ford", "Regular Cab", None, 2007)
    assert not _chip("body", "pickup").matches("Ford", "Sedan", None, 2007)
    assert _chip("colour", "red").matches(None, None, "Red", None)
    assert _chip("year", "1991-2007").matches(None, None, None, 1998)
    assert not _chip("year", "2005-").matches(None, None, None, None)


def test_a_make_labelled_through_the_queue_is_read_from_the_text() -> None:
    """A make the built-in table lacks but the index holds (a person labelled it) is a
    chip like the built-in ones; one nobody indexed is not."""
    vocab = FilterVocabulary(makes=frozenset({"Ford", "Zephyr", "Aston Zeta"}),
                             years=(2015,))
    got = parse_query("zephyr aero 2015", vocab)
    assert [(c.field, c.value) for c in got.chips] == [("make", "Zephyr"), ("year", "2015")]
    two = parse_query("an aston zeta coupe", vocab)
    assert ("make", "Aston Zeta") in [(c.field, c.value) for c in two.chips]
    assert parse_query("zephyr aero", FilterVocabulary(makes=frozenset({"Ford"}))).chips == ()
