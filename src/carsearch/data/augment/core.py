"""Query augmentation: several messy, human-typed queries per labelled image, judged.

    augment(items, OfflineGenerator(seed=0), RuleJudge(), Path("queries.jsonl"), 5)

`items` are (image_id, VehicleLabel) pairs. Each candidate query becomes one JSONL line
{image_id, query, generator, accepted, reason, detail}. The lines of one image are
written together and flushed, so an interrupted run loses at most the image it was on.
A rerun reads the file back, cuts off a truncated last line, and (since the last image
in the file may be cut short) rewrites that last image; every other image already in
the file is skipped. Images whose generation failed are not written, so a rerun
retries them.

Generators: `OfflineGenerator` (deterministic rules, the default) and `OllamaGenerator`
(an LLM through the official client). Judges: `RuleJudge` (the Pydantic guardrails in
augment_judge) and `OllamaJudge` (the rules, then the LLM's verdict; both must accept).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from carsearch.data.augment.judge import (
    Judge,
    JudgedQuery,
    LLMVerdict,
    RejectReason,
    RuleJudge,
    Verdict,
    judge_query,
)
from carsearch.data.augment.offline import OfflineGenerator
from carsearch.data.augment.ollama import (
    GenerationError,
    OllamaGenerator,
    OllamaJudge,
    OllamaUnavailableError,
)
from carsearch.platform.vehicles import VehicleLabel

__all__ = [
    "AugmentSummary",
    "GenerationError",
    "Judge",
    "JudgedQuery",
    "LLMVerdict",
    "OfflineGenerator",
    "OllamaGenerator",
    "OllamaJudge",
    "OllamaUnavailableError",
    "QueryGenerator",
    "RejectReason",
    "RuleJudge",
    "Verdict",
    "augment",
    "judge_query",
    "load_queries",
]

log = logging.getLogger(__name__)

_FIELDS = ("image_id", "query", "generator", "accepted", "reason")


class QueryGenerator(Protocol):
    """Writes up to `n` candidate queries for a label; `key` (the image id) seeds variety."""

    name: str

    def generate(self, label: VehicleLabel, n: int, *, key: str = "") -> list[str]: ...


@dataclass
class AugmentSummary:
    """What one `augment` run did."""

    out_path: Path
    images_total: int = 0
    images_skipped: int = 0
    images_done: int = 0
    images_failed: int = 0
    candidates: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def queries_per_s(self) -> float:
        return self.candidates / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.candidates if self.candidates else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_path": str(self.out_path),
            "images_total": self.images_total,
            "images_skipped": self.images_skipped,
            "images_done": self.images_done,
            "images_failed": self.images_failed,
            "candidates": self.candidates,
            "accepted": self.accepted,
            "rejected": dict(sorted(self.rejected.items())),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "seconds": round(self.seconds, 3),
            "queries_per_s": round(self.queries_per_s, 1),
        }


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or any(k not in record for k in _FIELDS):
        return None
    return record


def prepare_resume(out_path: Path) -> set[str]:
    """Image ids complete in `out_path`; cut the file back to the last complete image.

    Everything from the first unreadable line on (a crash's truncated line) goes, and so
    do the lines of the last image in the file, which may be incomplete.
    """
    if not out_path.exists():
        return set()
    data = out_path.read_bytes()
    ids: list[str] = []
    starts: list[int] = []
    offset = 0
    for line in data.splitlines(keepends=True):
        record = _parse(line) if line.endswith(b"\n") else None
        if record is None:
            break
        ids.append(str(record["image_id"]))
        starts.append(offset)
        offset += len(line)
    keep = offset
    if ids:
        last = ids[-1]
        i = len(ids) - 1
        while i > 0 and ids[i - 1] == last:
            i -= 1
        keep = starts[i]
        ids = ids[:i]
    if keep < len(data):
        log.info("resuming %s: cutting %d bytes after the last complete image",
                 out_path, len(data) - keep)
        with out_path.open("r+b") as f:
            f.truncate(keep)
    return set(ids)


def _generate_chunk(
    generator: QueryGenerator, labels: Sequence[VehicleLabel], keys: Sequence[str], n: int
) -> list[list[str] | GenerationError]:
    batch = getattr(generator, "generate_batch", None)
    if callable(batch):
        return list(batch(labels, n, keys))
    out: list[list[str] | GenerationError] = []
    for label, key in zip(labels, keys, strict=True):
        try:
            out.append(generator.generate(label, n, key=key))
        except OllamaUnavailableError:
            raise
        except GenerationError as exc:
            out.append(exc)
    return out


def _judge_image(judge: Judge, label: VehicleLabel, queries: list[str]) -> list[Verdict]:
    seen: set[str] = set()
    fresh: list[int] = []
    verdicts: list[Verdict | None] = []
    for i, q in enumerate(queries):
        key = " ".join(q.lower().split())
        if key in seen:
            verdicts.append(Verdict(q, False, RejectReason.DUPLICATE, "repeats an earlier query"))
        else:
            seen.add(key)
            fresh.append(i)
            verdicts.append(None)
    judged = judge.judge(label, [queries[i] for i in fresh])
    for i, v in zip(fresh, judged, strict=True):
        verdicts[i] = v
    return [v for v in verdicts if v is not None]


def _lines(image_id: str, generator: str, verdicts: list[Verdict]) -> str:
    return "".join(
        json.dumps(
            {
                "image_id": image_id,
                "query": v.query,
                "generator": generator,
                "accepted": v.accepted,
                "reason": v.reason.value if v.reason else None,
                "detail": v.detail,
            },
            ensure_ascii=False,
        )
        + "\n"
        for v in verdicts
    )


def augment(
    items: Iterable[tuple[str, VehicleLabel]],
    generator: QueryGenerator,
    judge: Judge,
    out_path: Path,
    n_per_image: int = 5,
    progress: bool = True,
) -> AugmentSummary:
    """Generate, judge and append queries for every image not already in `out_path`."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = prepare_resume(out_path)
    summary = AugmentSummary(out_path=out_path)
    todo: list[tuple[str, VehicleLabel]] = []
    for image_id, label in items:
        summary.images_total += 1
        if image_id in done:
            summary.images_skipped += 1
        else:
            done.add(image_id)
            todo.append((image_id, label))
    chunk = max(1, int(getattr(generator, "concurrency", 1)))
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc=f"augment ({generator.name})",
               disable=not progress)
    try:
        with out_path.open("a", encoding="utf-8") as f:
            for lo in range(0, len(todo), chunk):
                part = todo[lo : lo + chunk]
                ids = [i for i, _ in part]
                results = _generate_chunk(generator, [lb for _, lb in part], ids, n_per_image)
                for (image_id, label), result in zip(part, results, strict=True):
                    _record(f, summary, judge, generator.name, image_id, label, result)
                bar.update(len(part))
                bar.set_postfix(
                    accepted=summary.accepted,
                    rejected=sum(summary.rejected.values()),
                    refresh=False,
                )
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
    log.info("augment: %s", summary.to_dict())
    return summary


def _record(
    f: Any,
    summary: AugmentSummary,
    judge: Judge,
    generator: str,
    image_id: str,
    label: VehicleLabel,
    result: list[str] | GenerationError,
) -> None:
    if isinstance(result, GenerationError):
        log.warning("image %s: generation failed: %s", image_id, result)
        summary.images_failed += 1
        summary.rejected[RejectReason.GENERATION_FAILED.value] += 1
        return
    verdicts = _judge_image(judge, label, result)
    f.write(_lines(image_id, generator, verdicts))
    f.flush()
    summary.images_done += 1
    summary.candidates += len(verdicts)
    for v in verdicts:
        if v.accepted:
            summary.accepted += 1
        else:
            summary.rejected[v.reason.value if v.reason else "unknown"] += 1


def load_queries(path: Path, accepted_only: bool = True) -> dict[str, list[str]]:
    """image_id -> its queries from an augment JSONL file (unreadable lines skipped)."""
    out: dict[str, list[str]] = {}
    with path.open("rb") as f:
        for line in f:
            record = _parse(line)
            if record is None or (accepted_only and not record["accepted"]):
                continue
            out.setdefault(str(record["image_id"]), []).append(str(record["query"]))
    return out
