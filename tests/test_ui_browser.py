"""End to end in headless Chromium: type a query, press Enter, see results (filters read
from the text relaxed to fill the page, a vague year as a chip), click a result, ask for
more like it, and keep a screenshot; and the controls beyond the query: an exclusion read
from "not ...", "More results" through the cursor, and another order.

Needs Debian's `chromium` (/usr/bin/chromium) and Playwright for Python (its own
browser download is not used). Skips, saying which is missing, except under CI=true,
where both must be present and the test fails instead.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.browser import ARGS, CHROMIUM, _need
from ui_world import Server, World, build_world, run_server


@pytest.fixture(scope="module")
def browser_server(
    tmp_path_factory: pytest.TempPathFactory, compact_model: Path
) -> Iterator[Server]:
    _need(Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is not None,
          f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _need(False, "Playwright for Python is not installed (pip install playwright)")
    world: World = build_world(tmp_path_factory.mktemp("browser-world"), compact_model)
    yield from run_server(world, tmp_path_factory.mktemp("browser-log") / "server.log")


@pytest.fixture(scope="module")
def browser(browser_server: Server) -> Iterator[Any]:
    """One headless Chromium for the module's tests (each opens its own tab)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def _open_page(browser: Any, url: str) -> Any:
    """The search page in a new tab, loaded (its header names the serving version)."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(url)
    expect(page.locator("#header")).to_contain_text("Serving model base")
    return page


def test_search_select_and_more_like_this_in_chromium(
    browser_server: Server, browser: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page = _open_page(browser, browser_server.url)
    box = page.locator("#query textarea, #query input").first
    box.fill("red 2012 chevy pickup")
    box.press("Enter")
    status = page.locator("#status")
    expect(status).to_contain_text("results for 'red 2012 chevy pickup'")
    expect(page.locator("#chips")).to_contain_text("make: Chevrolet")
    # One vehicle meets all four filters: the page is filled with the nearest
    # others and says what it relaxed.
    expect(status).to_contain_text("only 1 red Chevrolet pickup from 2012; showing")
    thumbs = page.locator("#results img")
    expect(thumbs.first).to_be_visible()
    expect(thumbs).to_have_count(8)

    # The design's other example: a vague year and a make + body nobody indexed
    # together ("older model": the oldest third of the world's 4 model years).
    box.fill("older model mercedes coupe")
    box.press("Enter")
    expect(status).to_contain_text("results for 'older model mercedes coupe'")
    expect(page.locator("#chips")).to_contain_text("year: 1991-1997 (older model)")
    expect(status).to_contain_text(
        "no Mercedes-Benz coupe from 1991-1997; showing Mercedes-Benz of any body")
    expect(thumbs).to_have_count(8)
    page.screenshot(path=str(tmp_path / "relaxed.png"), full_page=True)

    box.fill("a car")
    box.press("Enter")
    expect(status).to_contain_text("results for 'a car'")
    expect(thumbs).to_have_count(8)
    thumbs.nth(2).click()
    selected = page.locator("#selected-id textarea, #selected-id input").first
    expect(selected).not_to_have_value("")
    chosen = selected.input_value()
    expect(page.locator("#detail")).to_contain_text(f"id {chosen}")

    page.locator("#more-like-this").click()
    expect(status).to_contain_text("results for image query")
    expect(thumbs.first).to_be_visible()
    shot = tmp_path / "more-like-this.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()


def _fields(caption: str) -> list[str]:
    """A result's caption (ui/page.py `caption`) split at its separators."""
    return caption.split(" · ")


def _year(caption: str) -> int:
    """The model year: the last number of the caption's name ("Ford F-150 ... 2007")."""
    return int(re.findall(r"\b\d{4}\b", _fields(caption)[2])[-1])


def _unmet(caption: str) -> str:
    """What a hit of a relaxed search does not meet ("" for the search's own hits)."""
    return next((f for f in _fields(caption) if f.startswith("not ")), "")


def test_exclusion_more_results_and_sort_in_chromium(browser_server: Server,
                                                    browser: Any) -> None:
    from playwright.sync_api import expect

    page = _open_page(browser, browser_server.url)
    # Three a page, so that the world's 6 vehicles that are not red take two.
    page.locator("#top-k input[type=number]").fill("3")
    page.locator("#top-k input[type=number]").press("Tab")
    expect(page.locator("#top-k input[type=range]")).to_have_value("3")

    box = page.locator("#query textarea, #query input").first
    box.fill("pickup not red")
    box.press("Enter")
    status = page.locator("#status")
    expect(status).to_contain_text("results for 'pickup not red'")
    expect(status).to_contain_text("excluding not colour: red")
    excluded = page.locator("#exclusions")
    expect(excluded).to_be_visible()
    expect(excluded).to_contain_text("not colour: red")
    expect(excluded.locator("input[type=checkbox]")).to_have_count(1)
    expect(excluded.locator("input[type=checkbox]")).to_be_checked()
    thumbs = page.locator("#results img")
    captions = page.locator("#results .caption-label")
    expect(thumbs).to_have_count(3)
    expect(captions).to_have_count(3)
    first = captions.all_inner_texts()
    assert all("red" not in _fields(c) for c in first), first

    page.locator("#more-results").click()
    expect(status).to_contain_text("6 results shown")
    expect(thumbs).to_have_count(6)
    expect(captions).to_have_count(6)
    both = captions.all_inner_texts()
    assert both[:3] == first, both  # added below the first page
    # Ranks go on from the first page, and no vehicle comes twice (the world's
    # names are unique).
    assert [_fields(c)[0] for c in both] == [f"#{n}" for n in range(1, 7)], both
    assert len({_fields(c)[2] for c in both}) == 6, both
    assert all("red" not in _fields(c) for c in both), both

    # Newest model year first (within what the search met, then what it relaxed):
    # the page starts again, and "More results" goes on in that order to the end.
    page.locator("#sort input").click()
    page.locator("li[role=option]", has_text="newest model year").click()
    expect(status).not_to_contain_text("results shown")
    expect(status).to_contain_text("3 results for 'pickup not red'")
    expect(thumbs).to_have_count(3)
    page.locator("#more-results").click()
    expect(status).to_contain_text("6 results shown")
    expect(captions).to_have_count(6)
    by_year = captions.all_inner_texts()
    # The same six vehicles (none red: the exclusion is still ticked), reordered.
    assert {_fields(c)[2] for c in by_year} == {_fields(c)[2] for c in both}, by_year
    tiers = [_unmet(c) for c in by_year]
    assert tiers == sorted(tiers, key=lambda t: t != ""), by_year  # met first
    for tier in set(tiers):
        years = [_year(c) for c in by_year if _unmet(c) == tier]
        assert years == sorted(years, reverse=True), by_year
    page.locator("#more-results").click()
    expect(status).to_contain_text("No more results")
    expect(thumbs).to_have_count(6)
    page.close()
