"""Natural-language filters: phrases, years, word boundaries, validation against the DB."""

from __future__ import annotations

from pathlib import Path

import pytest

from carsearch.platform.db import Database, Image, ImageStatus, migrate
from carsearch.platform.errors import QueryError
from carsearch.platform.search.nlfilters import (
    FilterVocabulary,
    VocabularyCache,
    filters_from_chips,
    load_vocabulary,
    merge_filters,
    parse_query,
    validate_filters,
)
from carsearch.platform.vectors.store import SearchFilters

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
    from carsearch.platform.search.vocabulary import body_category

    assert body_category("Regular Cab") == body_category("regular cab") == "pickup"
    assert body_category("Sedan") == body_category(" sedan ") == "sedan"
    assert body_category("Limousine") == "limousine"  # no category: still filterable
    assert body_category(None) == body_category("") == ""
