"""The Evaluation tab's served view: what the serving version scores through the index.

`served_markdown` shows the result last stored for the serving version
(`carsearch evaluate --served`, which `make demo` runs, or the tab's button);
`run_served` measures it now: the default queries (every class name the database holds,
and one held-out phrasing per class) through the search service, nothing read from the
text, scored on the database's labels (`platform.search.evaluation`). Shown: R@1/5/10,
mAP and MRR with 95 % bootstrap intervals over queries, what a random ranking of the same
images would score, and the expected calibration error of the probability the page shows.

Kept apart from `page` and `app` (one function each wires it in) so that changes to the
search tab and to this tab do not meet.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from carsearch.platform.errors import ConfigError
from carsearch.platform.runtime import Platform
from carsearch.platform.search.evaluation import (
    evaluate_served,
    served_query_sets,
    store_served,
    stored_served,
)

log = logging.getLogger(__name__)

METRICS = ("recall@1", "recall@5", "recall@10", "mAP", "MRR")
HEADERS = ("R@1", "R@5", "R@10", "mAP", "MRR")
_RUNNING = threading.Lock()  # one served evaluation at a time in a page process


def _cell(summary: dict[str, Any], key: str) -> str:
    value = summary.get(key)
    if value is None:
        return "–"
    lo_hi = (summary.get("ci95") or {}).get(key)
    if lo_hi and None not in lo_hi:
        return f"{value:.3f} [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]"
    return f"{value:.3f}"


def _ece(summary: dict[str, Any]) -> str:
    cal = summary.get("calibration") or {}
    if not cal.get("n") or cal.get("ece") is None:
        return "–"
    return f"{cal['ece']:.4f} ({cal['n']:,} pairs)"


def served_table(result: dict[str, Any]) -> str:
    """A stored served evaluation as Markdown: one row per query set and its chance row."""
    lines = [
        f"**Served view** of version **{result.get('version', '?')}**: collection "
        f"`{result.get('collection', '?')}`, {result.get('n_images', 0):,} indexed images, "
        f"each query asks for {result.get('k', 0):,} hits, filters: "
        f"{result.get('filters', 'none')}; measured {result.get('measured_at', '?')}.",
        "",
        "| queries | n | " + " | ".join(HEADERS) + " | ECE |",
        "|---|---|" + "---|" * (len(HEADERS) + 1),
    ]
    for name, summary in (result.get("query_sets") or {}).items():
        lines.append(f"| {name} | {summary.get('n_queries', 0)} | "
                     + " | ".join(_cell(summary, k) for k in METRICS)
                     + f" | {_ece(summary)} |")
        chance = summary.get("chance") or {}
        lines.append(f"| chance ({name}) | – | "
                     + " | ".join("–" if chance.get(k) is None else f"{chance[k]:.3f}"
                                  for k in METRICS) + " | – |")
    lines += ["", "[95 % bootstrap interval over queries]. Chance: what a random ranking of "
              "the same images scores. ECE: expected calibration error of the probability "
              "each hit shows (0: p equals the observed share of relevant hits)."]
    return "\n".join(lines)


def served_markdown(platform: Platform, collection: str | None = None) -> str:
    """The stored served evaluation of the serving version, or how to get one."""
    try:
        version = platform.search.serving(collection)
        stored = stored_served(platform.db, version.name)
    except ConfigError as exc:
        return f"No served evaluation: {exc}"
    except Exception as exc:  # the tab must render with a broken database
        log.exception("served evaluation")
        return f"**Served evaluation unavailable:** {exc}"
    if stored is None:
        return (f"No served evaluation of version **{version.name}** yet: press *Run the "
                "served evaluation* (or run `carsearch evaluate --served`).")
    return served_table(stored)


def run_served(platform: Platform, collection: str | None = None) -> str:
    """Measure the serving version now, keep the result with it, and show it."""
    if not _RUNNING.acquire(blocking=False):
        return "A served evaluation is already running on this page; try again shortly."
    try:
        name = platform.search.collection(collection)
        sets = served_query_sets(platform.db, name)
        if not any(sets.values()):
            return (f"Collection `{name}` has no labelled indexed images to score: nothing "
                    "to measure.")
        result = evaluate_served(platform.search, sets, collection=collection)
        store_served(platform.db, result)
        return served_table({**result, **(stored_served(platform.db, result["version"])
                                          or {})})
    finally:
        _RUNNING.release()


def served_section(demo: Any, platform: Platform, guard: Any) -> None:
    """The tab's part (inside its `gr.Tab`): the stored result on load, a button that
    measures it again. `guard` wraps a handler as the page wraps all of its own."""
    import gradio as gr

    gr.Markdown("### What is served, measured")
    shown = gr.Markdown("", elem_id="served-evaluation")
    run = gr.Button("Run the served evaluation", elem_id="served-evaluation-run")
    demo.load(guard(lambda: served_markdown(platform)), None, shown,
              api_name="served_evaluation")
    run.click(guard(lambda: run_served(platform)), None, shown,
              api_name="run_served_evaluation", concurrency_limit=1)
