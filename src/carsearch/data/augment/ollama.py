"""Query generation and judging through an Ollama server, with the official client.

Every request asks for structured output: `format=` is the JSON schema of a Pydantic
model, and the answer is validated with that model. A malformed answer, a timeout or a
server error (5xx) is retried with exponential backoff; a refused connection or a
missing model is a `CarsearchError` at once, with a message saying what to do.
Batches run on a thread pool with a bounded number of workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import ollama
from pydantic import BaseModel, Field, ValidationError

from carsearch.data.augment.judge import LLMVerdict, RuleJudge, Verdict, judge_query
from carsearch.platform.errors import CarsearchError
from carsearch.platform.vehicles import VehicleLabel

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class OllamaUnavailableError(CarsearchError):
    """The Ollama server cannot be reached, or lacks the model."""


class GenerationError(CarsearchError):
    """The LLM gave no usable answer after every retry."""


class GeneratedQueries(BaseModel):
    """The structured answer the generator asks for."""

    queries: list[str] = Field(min_length=1, max_length=50)


GENERATE_PROMPT = """You write search queries that people type to find a photo of a vehicle.
Vehicle: make {make}; model {model}; body {body}; year {year}; colour {colour}.
Write {n} different short queries (2 to 8 words) as a hurried person types them: lower case,
abbreviations and nicknames for the make (chevy, merc, vw, bimmer), loose year phrasing
("'12", "late 2000s", "older model", "newer"), sometimes a typo, sometimes only part of the
facts. Use only the facts above: never another make, another year, a colour that is not
given, a background or place, or aftermarket parts. Answer as JSON: {{"queries": [...]}}."""

JUDGE_PROMPT = """Vehicle: make {make}; model {model}; body {body}; year {year}; colour {colour}.
Search query: "{query}"
Does every fact in the query fit the vehicle? Reject it if it names another make, a year or
era that does not fit, a colour not given, a background or scene, or aftermarket parts
(reasons: other_make, year, colour, scene, aftermarket). Answer as JSON:
{{"accepted": true|false, "reason": null|"<reason>", "explanation": "<a few words>"}}."""


def _facts(label: VehicleLabel) -> dict[str, Any]:
    return {
        "make": label.make,
        "model": label.model or "unknown",
        "body": label.body_type or "unknown",
        "year": label.year or "unknown",
        "colour": label.colour or "not given",
    }


class OllamaChat:
    """One structured chat request with retries, backoff and clear errors."""

    def __init__(
        self,
        host: str,
        model: str = "qwen2.5:14b",
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        temperature: float = 0.8,
    ) -> None:
        self.host = host
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.temperature = temperature
        self.client = ollama.Client(host=host, timeout=timeout)

    def ask(self, prompt: str, schema: type[M]) -> M:
        """Send `prompt`, return the answer validated by `schema`; retry on bad answers."""
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._once(prompt, schema)
            except ValidationError as exc:
                last = f"malformed answer ({exc.error_count()} errors)"
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout:g} s"
            except ollama.ResponseError as exc:
                if exc.status_code == 404:
                    raise OllamaUnavailableError(
                        f"model {self.model!r} is not on the Ollama server at {self.host}: "
                        f"run `ollama pull {self.model}` there, or choose another model"
                    ) from None
                if exc.status_code < 500:
                    raise GenerationError(f"Ollama refused the request: {exc}") from None
                last = f"server error {exc.status_code}"
            log.warning("ollama attempt %d/%d: %s", attempt + 1, self.max_retries + 1, last)
        raise GenerationError(f"no usable answer from Ollama after {self.max_retries + 1} tries: "
                              f"{last}")

    def _once(self, prompt: str, schema: type[M]) -> M:
        try:
            response = self.client.chat(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                format=schema.model_json_schema(),
                options={"temperature": self.temperature},
            )
        except ConnectionError:
            raise OllamaUnavailableError(
                f"cannot reach the Ollama server at {self.host} (connection refused): start it "
                "with `ollama serve`, set CARSEARCH_OLLAMA_HOST, or use --generator offline"
            ) from None
        return schema.model_validate_json(response.message.content or "")


class OllamaGenerator:
    """LLM query generator; `generate_batch` runs up to `concurrency` requests at once."""

    name = "ollama"

    def __init__(
        self,
        host: str,
        model: str = "qwen2.5:14b",
        timeout: float = 120.0,
        max_retries: int = 3,
        concurrency: int = 4,
        backoff_s: float = 1.0,
    ) -> None:
        if concurrency < 1:
            raise CarsearchError("concurrency must be at least 1")
        self.chat = OllamaChat(host, model, timeout, max_retries, backoff_s)
        self.concurrency = concurrency

    def generate(self, label: VehicleLabel, n: int, *, key: str = "") -> list[str]:
        """Up to `n` distinct queries from the LLM (raises GenerationError when it fails)."""
        answer = self.chat.ask(GENERATE_PROMPT.format(n=n, **_facts(label)), GeneratedQueries)
        out: list[str] = []
        for q in answer.queries:
            if q not in out:
                out.append(q)
        return out[:n]

    def generate_batch(
        self, labels: Sequence[VehicleLabel], n: int, keys: Sequence[str]
    ) -> list[list[str] | GenerationError]:
        """Generate for many labels concurrently; a label that fails gets its error.

        OllamaUnavailableError (server down, model missing) is raised, not returned.
        """
        def one(i: int) -> list[str] | GenerationError:
            try:
                return self.generate(labels[i], n, key=keys[i])
            except OllamaUnavailableError:
                raise
            except GenerationError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, range(len(labels))))


class OllamaJudge:
    """The rule judge, then the LLM's verdict on what the rules accept (both must agree)."""

    name = "ollama"

    def __init__(
        self,
        host: str,
        model: str = "qwen2.5:14b",
        timeout: float = 120.0,
        max_retries: int = 3,
        concurrency: int = 4,
        backoff_s: float = 1.0,
    ) -> None:
        self.chat = OllamaChat(host, model, timeout, max_retries, backoff_s, temperature=0.0)
        self.rules = RuleJudge()
        self.concurrency = concurrency

    def _ask(self, label: VehicleLabel, query: str) -> Verdict:
        prompt = JUDGE_PROMPT.format(query=query.replace('"', "'"), **_facts(label))
        try:
            verdict = self.chat.ask(prompt, LLMVerdict)
        except GenerationError as exc:
            verdict = LLMVerdict(accepted=False, explanation=str(exc)[:500])
        return judge_query(label, query, verdict)

    def judge(self, label: VehicleLabel, queries: Sequence[str]) -> list[Verdict]:
        first = self.rules.judge(label, queries)
        todo = [i for i, v in enumerate(first) if v.accepted]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            second = list(pool.map(lambda i: self._ask(label, queries[i]), todo))
        for i, verdict in zip(todo, second, strict=True):
            first[i] = verdict
        return first
