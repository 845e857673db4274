"""Markdown and tables for the page's header, Status tab and Evaluation tab."""

from __future__ import annotations

import logging
from typing import Any

from carsearch.platform.runtime import Platform
from carsearch.ui import status as st

log = logging.getLogger(__name__)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    if hasattr(value, "isoformat"):
        return f"{value:%Y-%m-%d %H:%M}"
    return str(value)


def page_header(platform: Platform) -> str:
    """"Serving model **v3** · 8,144 vectors indexed" (or what is missing)."""
    try:
        info = st.serving_info(platform.db, platform.managed)
    except Exception as exc:  # the page must render even with a broken database
        log.warning("header: %s", exc)
        return f"## carsearch\nstatus unavailable: {exc}"
    if info.version is None:
        return ("## carsearch\nNo serving model version: publish one and run "
                "`carsearch models promote NAME`.")
    size = "unknown" if info.index_size is None else f"{info.index_size:,}"
    return (f"## carsearch\nServing model **{info.version}** · index size **{size}** vectors "
            f"· {info.images_indexed:,} images indexed")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def _drift_md(drift: dict[str, Any] | None) -> str:
    if drift is None:
        return "no report yet"
    rows = [drift] + ([drift["last_check"]] if drift.get("last_check") else [])
    return _table(
        ["created", "result", "images", "isolated", "retrain triggered"],
        [[d["created_at"], d.get("status") or "-", d["n_images"], d["n_isolated"],
          "yes" if d["retrain_triggered"] else "no"] for d in rows],
    )


def _ann_md(ann: dict[str, Any] | None) -> str:
    if not ann:
        return "no report yet"
    keys = [k for k in ("created_at", "index_type", "n_vectors", "n_queries", "recall_at_10")
            if k in ann]
    if not keys:
        keys = [k for k, v in ann.items() if not isinstance(v, dict | list)][:6]
    return _table(keys, [[ann.get(k) for k in keys]])


def _loops_md(loops: list[dict[str, Any]]) -> str:
    if not loops:
        return "none reported (no ingest worker or scheduled job has run)"
    return _table(
        ["process", "role", "loop", "state", "updated", "failures", "last error"],
        [[lp["process"], lp["role"], lp["loop"], f"**{lp['state']}**", lp["updated_at"],
          lp["failures"], (lp["last_error"] or "")[:120]] for lp in loops],
    )


def status_markdown(platform: Platform) -> str:
    """The Status tab: serving version, index size, queue, drift, ANN audit, versions."""
    try:
        s = st.system_status(platform.db, platform.managed)
    except Exception as exc:
        log.exception("status")
        return f"**Status unavailable:** {exc}"
    size = "unknown" if s.serving.index_size is None else f"{s.serving.index_size:,}"
    parts = [
        "### Serving",
        f"version **{s.serving.version or 'none'}** · collection `{s.serving.collection or '–'}`"
        f" · index size {size} · images {', '.join(f'{k} {v}' for k, v in s.images.items())}"
        f" · search: {s.serving.search_backend or 'unknown'}"
        + (f" · Milvus alias `carsearch_serving` → `{s.alias}`" if s.alias else ""),
        "### Background loops",
        _loops_md(s.loops),
        "### Ingest queue",
        _table(list(s.queue), [list(s.queue.values())]),
        "### Last drift report",
        _drift_md(s.drift),
        "### Data flywheel",
        f"Labelling tasks: {s.labelling.get('open', 0)} open, "
        f"{s.labelling.get('done', 0)} done (the Label tab, or `carsearch label export`)",
        _table(["drift report", "at", "isolated clusters", "labelling tasks", "retrain"],
               [[e["id"], e["created_at"], e["n_isolated"],
                 ", ".join(map(str, e["label_tasks"])) or "–", e["retrain"] or "–"]
                for e in s.drift_events]) if s.drift_events else "no drift events yet",
        _table(["retrain request", "asked by", "state", "version", "why"],
               [[r["id"], r["requested_by"], r["state"], r["version"] or "–", r["reason"] or "–"]
                for r in s.retrain_requests]) if s.retrain_requests
        else "no retrain requests yet (drift events make them; or `carsearch retrain request`)",
        _table(["training run", "started", "finished", "version", "outcome"],
               [[r["id"], r["started_at"], r["finished_at"], r["version"] or "–",
                 r["outcome"]] for r in s.retrains]) if s.retrains else "no training runs yet",
        "### Latest ANN audit",
        _ann_md(s.ann),
        "### Model versions",
        _table(["name", "status", "dim", "created", "promoted"],
               [[v.name, v.status, v.dim, v.created_at, v.promoted_at] for v in s.versions])
        if s.versions else "none published",
    ]
    return "\n\n".join(parts)


def evaluation_table(platform: Platform) -> tuple[str, Any]:
    """(note, pandas-free table value) for the Evaluation tab."""
    try:
        table = st.latest_metrics(platform.db, platform.settings)
    except Exception as exc:
        log.exception("evaluation")
        return f"**Metrics unavailable:** {exc}", None
    if table is None:
        return "No evaluation results yet (train and evaluate a model first).", None
    rows = [[r[0], *[round(v, 4) if isinstance(v, float) else v for v in r[1:]]]
            for r in table.rows]
    return f"Latest metrics from {table.source}", {"headers": table.columns, "data": rows}
