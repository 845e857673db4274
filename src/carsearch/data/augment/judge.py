"""The guardrail judge: a candidate query passes only what its label supports.

`JudgedQuery` is a Pydantic model validated with the label in its validation context
(`JudgedQuery.model_validate({...}, context={"label": label})`). Its validators reject,
each with its own `RejectReason`: empty or over-long text, a different make, a year the
label does not have, a colour not in the label's metadata, a background or scene, an
aftermarket part. An optional LLM verdict (`LLMVerdict`, the structured answer of the
Ollama judge) goes through the same model: the query is accepted only when the rules
and the LLM both accept it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from carsearch.data.augment import rules
from carsearch.platform.vehicles import VehicleLabel


class RejectReason(StrEnum):
    """Why a candidate query was rejected (the counts in the summary use these)."""

    EMPTY = "empty"
    TOO_LONG = "too_long"
    OTHER_MAKE = "other_make"
    YEAR = "year"
    COLOUR = "colour"
    SCENE = "scene"
    AFTERMARKET = "aftermarket"
    DUPLICATE = "duplicate"
    LLM = "llm_rejected"
    GENERATION_FAILED = "generation_failed"


class LLMVerdict(BaseModel):
    """The structured verdict the LLM judge must return."""

    accepted: bool
    reason: RejectReason | None = Field(
        default=None, description="Why the query is rejected; null when accepted."
    )
    explanation: str = Field(default="", max_length=500)


def _fail(reason: RejectReason, message: str) -> PydanticCustomError:
    return PydanticCustomError(reason.value, message)


def _check_length(text: str, label: VehicleLabel) -> None:
    if not text:
        raise _fail(RejectReason.EMPTY, "the query is empty")
    if len(text) > rules.MAX_QUERY_CHARS:
        raise _fail(RejectReason.TOO_LONG, f"the query is over {rules.MAX_QUERY_CHARS} chars")


def _check_make(text: str, label: VehicleLabel) -> None:
    if found := rules.other_makes(text, label):
        raise _fail(RejectReason.OTHER_MAKE, f"names another make than {label.make}: {found}")


def _check_year(text: str, label: VehicleLabel) -> None:
    if bad := rules.bad_year_claims(text, label):
        raise _fail(RejectReason.YEAR, f"year phrasing {bad} does not fit {label.year}")


def _check_colour(text: str, label: VehicleLabel) -> None:
    if found := rules.other_colours(text, label):
        raise _fail(RejectReason.COLOUR, f"colour {found} not in the label ({label.colour})")


def _check_scene(text: str, label: VehicleLabel) -> None:
    if found := rules.found_terms(text, rules.SCENE_TERMS, label):
        raise _fail(RejectReason.SCENE, f"describes a background or scene: {found}")


def _check_aftermarket(text: str, label: VehicleLabel) -> None:
    if found := rules.found_terms(text, rules.AFTERMARKET_TERMS, label):
        raise _fail(RejectReason.AFTERMARKET, f"names an aftermarket part: {found}")


CHECKS: tuple[Callable[[str, VehicleLabel], None], ...] = (
    _check_length,
    _check_make,
    _check_year,
    _check_colour,
    _check_scene,
    _check_aftermarket,
)


class JudgedQuery(BaseModel):
    """A query the label supports; validate with context={"label": VehicleLabel}."""

    query: str
    llm_verdict: LLMVerdict | None = None

    @field_validator("query")
    @classmethod
    def _supported_by_label(cls, value: str, info: ValidationInfo) -> str:
        label = (info.context or {}).get("label")
        if not isinstance(label, VehicleLabel):
            raise ValueError("JudgedQuery needs context={'label': VehicleLabel}")
        text = " ".join(value.split())
        normalised = rules.normalise(text)
        for check in CHECKS:
            check(normalised, label)
        return text

    @model_validator(mode="after")
    def _llm_agrees(self) -> JudgedQuery:
        verdict = self.llm_verdict
        if verdict is not None and not verdict.accepted:
            said = verdict.reason.value if verdict.reason else "unspecified"
            raise _fail(RejectReason.LLM, f"LLM judge rejected ({said}): {verdict.explanation}")
        return self


@dataclass(frozen=True)
class Verdict:
    """The judge's decision on one candidate."""

    query: str
    accepted: bool
    reason: RejectReason | None = None
    detail: str = ""


def judge_query(label: VehicleLabel, query: str, llm: LLMVerdict | None = None) -> Verdict:
    """Validate one query against its label through `JudgedQuery`."""
    data: dict[str, Any] = {"query": query, "llm_verdict": llm}
    try:
        judged = JudgedQuery.model_validate(data, context={"label": label})
    except ValidationError as exc:
        error = exc.errors()[0]
        try:
            reason = RejectReason(error["type"])
        except ValueError:  # a malformed input (not a string): treat as empty
            reason = RejectReason.EMPTY
        return Verdict(query, False, reason, str(error["msg"]))
    return Verdict(judged.query, True)


class Judge(Protocol):
    """Decides, for each candidate query of one label, whether the label supports it."""

    name: str

    def judge(self, label: VehicleLabel, queries: Sequence[str]) -> list[Verdict]: ...


class RuleJudge:
    """The rule-based judge: `JudgedQuery`'s validators only, no network."""

    name = "rules"

    def judge(self, label: VehicleLabel, queries: Sequence[str]) -> list[Verdict]:
        return [judge_query(label, q) for q in queries]
