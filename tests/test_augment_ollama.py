"""The Ollama path of query augmentation, with the real `ollama` Python client.

No Ollama binary (and no model) is available on this machine, so the server is a
stand-in: a small HTTP server on 127.0.0.1 (an ephemeral port, in a thread) that
answers POST /api/chat the way Ollama does for a non-streaming chat request. Each test
scripts what the "model" answers: good structured output, malformed JSON, a reply slower
than the client's timeout, a missing model. A refused connection uses a closed port.
Everything on the client side (the ollama client, httpx, retries, the thread pool, the
Pydantic validation and the judge) is the real code.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import typer

from carsearch.data.augment import (
    GenerationError,
    OllamaGenerator,
    OllamaJudge,
    OllamaUnavailableError,
    RejectReason,
    RuleJudge,
    augment,
)
from carsearch.data.augment.ollama import GeneratedQueries
from carsearch.platform.errors import CarsearchError
from carsearch.platform.vehicles import parse_class_name

SILVERADO = parse_class_name("Chevrolet Silverado 1500 Extended Cab 2012", colour="red")
ACCORD = parse_class_name("Honda Accord Sedan 2012")

Action = tuple[str, Any]  # ("answer", content) | ("sleep", (seconds, content)) | ("status", code)


def good_queries(request: dict[str, Any]) -> str:
    return json.dumps({"queries": ["red chevy silverado", "2012 chevy truck", "silverado '12"]})


@dataclass
class StandIn:
    """What the stand-in server answers, and what it was asked."""

    script: list[Action] = field(default_factory=list)
    default: Callable[[dict[str, Any]], str] = good_queries
    requests: list[dict[str, Any]] = field(default_factory=list)
    barrier: threading.Barrier | None = None
    inflight: int = 0
    max_inflight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_action(self, request: dict[str, Any]) -> Action:
        with self.lock:
            self.requests.append(request)
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            if self.script:
                return self.script.pop(0)
        return ("answer", self.default(request))

    def done(self) -> None:
        with self.lock:
            self.inflight -= 1


def _handler(state: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            if self.path != "/api/chat":
                self._send(404, {"error": "not found"})
                return
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            kind, arg = state.next_action(request)
            try:
                if state.barrier is not None:
                    state.barrier.wait(timeout=10)
                if kind == "sleep":
                    time.sleep(arg[0])
                    kind, arg = "answer", arg[1]
                if kind == "status":
                    self._send(arg, {"error": f"model '{request['model']}' not found"})
                    return
                self._send(200, {
                    "model": request["model"],
                    "created_at": "2025-01-01T00:00:00Z",
                    "message": {"role": "assistant", "content": arg},
                    "done": True,
                    "done_reason": "stop",
                })
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass
            finally:
                state.done()

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[str, StandIn]]:
    state = StandIn()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def generator(host: str, **kw: Any) -> OllamaGenerator:
    opts: dict[str, Any] = {"timeout": 5.0, "max_retries": 2, "backoff_s": 0.01}
    opts.update(kw)
    return OllamaGenerator(host, model="qwen2.5:14b", **opts)


def test_structured_output_through_the_real_client(server: tuple[str, StandIn]) -> None:
    host, state = server
    queries = generator(host).generate(SILVERADO, 2)
    assert queries == ["red chevy silverado", "2012 chevy truck"]
    (request,) = state.requests
    assert request["model"] == "qwen2.5:14b"
    assert request["stream"] is False
    assert request["format"] == GeneratedQueries.model_json_schema()
    assert "temperature" in request["options"]
    prompt = request["messages"][0]["content"]
    assert "Chevrolet" in prompt and "Silverado 1500" in prompt and "red" in prompt


def test_malformed_json_is_retried_then_succeeds(server: tuple[str, StandIn]) -> None:
    host, state = server
    state.script = [("answer", '{"queries": ["red chevy'), ("answer", '{"query": "wrong key"}')]
    assert generator(host).generate(SILVERADO, 3) == [
        "red chevy silverado", "2012 chevy truck", "silverado '12"]
    assert len(state.requests) == 3


def test_malformed_json_gives_up_and_is_counted(server: tuple[str, StandIn],
                                                tmp_path: Path) -> None:
    host, state = server
    state.script = [("answer", "not json")] * 3  # first image: every try malformed
    with pytest.raises(GenerationError, match="3 tries"):
        generator(host, max_retries=2).generate(SILVERADO, 3)
    assert len(state.requests) == 3

    state.script = [("answer", "not json")] * 3
    out = tmp_path / "q.jsonl"
    items = [("a", SILVERADO), ("b", SILVERADO)]
    gen = generator(host, max_retries=2, concurrency=1)
    summary = augment(items, gen, RuleJudge(), out, 3, progress=False)
    assert summary.images_failed == 1 and summary.images_done == 1
    assert summary.rejected[RejectReason.GENERATION_FAILED.value] == 1
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["image_id"] for r in lines} == {"b"}
    assert {r["generator"] for r in lines} == {"ollama"}
    # a rerun retries the failed image (and redoes the last one written), no duplicates
    again = augment(items, gen, RuleJudge(), out, 3, progress=False)
    assert again.images_failed == 0 and again.images_done == 2
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    keys = [(r["image_id"], r["query"]) for r in lines]
    assert len(keys) == len(set(keys)) == 6


def test_timeout_is_retried(server: tuple[str, StandIn]) -> None:
    host, state = server
    state.script = [("sleep", (2.0, good_queries({})))]
    queries = generator(host, timeout=0.3).generate(SILVERADO, 1)
    assert queries == ["red chevy silverado"]
    assert len(state.requests) == 2


def test_timeouts_give_up_with_a_clear_error(server: tuple[str, StandIn]) -> None:
    host, state = server
    state.script = [("sleep", (2.0, good_queries({})))] * 2
    with pytest.raises(GenerationError, match=r"timed out after 0\.3 s"):
        generator(host, timeout=0.3, max_retries=1).generate(SILVERADO, 1)


def test_refused_connection_is_a_clear_carsearch_error(tmp_path: Path) -> None:
    host = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(CarsearchError) as info:
        generator(host).generate(SILVERADO, 3)
    assert isinstance(info.value, OllamaUnavailableError)
    message = str(info.value)
    assert host in message and "connection refused" in message and "ollama serve" in message
    # through augment the run stops with the same error, nothing half-written
    out = tmp_path / "q.jsonl"
    with pytest.raises(OllamaUnavailableError):
        augment([("a", SILVERADO)], generator(host), RuleJudge(), out, 3, progress=False)
    assert out.read_text() == ""


def test_missing_model_says_how_to_pull_it(server: tuple[str, StandIn]) -> None:
    host, state = server
    state.script = [("status", 404)]
    with pytest.raises(OllamaUnavailableError, match=r"ollama pull qwen2\.5:14b"):
        generator(host).generate(SILVERADO, 3)
    assert len(state.requests) == 1  # not retried


def test_batches_run_with_bounded_concurrency(server: tuple[str, StandIn],
                                              tmp_path: Path) -> None:
    host, state = server
    state.barrier = threading.Barrier(3)  # the server waits until 3 requests are in flight
    items = [(f"img{i}", SILVERADO) for i in range(6)]
    summary = augment(items, generator(host, concurrency=3), RuleJudge(), tmp_path / "q.jsonl",
                      3, progress=False)
    assert summary.images_done == 6
    assert state.max_inflight == 3
    assert len(state.requests) == 6


def verdicts(request: dict[str, Any]) -> str:
    prompt = request["messages"][0]["content"]
    if "sedan" in prompt.split("Search query:")[1]:
        return json.dumps({"accepted": False, "reason": "other_make", "explanation": "no"})
    return json.dumps({"accepted": True, "reason": None, "explanation": "fits"})


def test_ollama_judge_and_rules_must_both_accept(server: tuple[str, StandIn]) -> None:
    host, state = server
    state.default = verdicts
    judge = OllamaJudge(host, timeout=5.0, max_retries=1, concurrency=2, backoff_s=0.01)
    queries = ["honda accord", "honda accord sedan", "red honda accord", "accord on the beach"]
    result = judge.judge(ACCORD, queries)
    assert [v.accepted for v in result] == [True, False, False, False]
    assert [v.reason for v in result] == [
        None, RejectReason.LLM, RejectReason.COLOUR, RejectReason.SCENE]
    # only what the rules accepted went to the LLM, each with the verdict schema
    assert len(state.requests) == 2
    assert all(r["format"]["properties"].keys() >= {"accepted", "reason"}
               for r in state.requests)
    assert all(r["options"]["temperature"] == 0.0 for r in state.requests)


def test_ollama_judge_malformed_verdict_is_a_rejection(server: tuple[str, StandIn]) -> None:
    host, state = server
    state.script = [("answer", '{"accepted": "maybe"}')] * 2
    judge = OllamaJudge(host, timeout=5.0, max_retries=1, backoff_s=0.01)
    (verdict,) = judge.judge(ACCORD, ["honda accord"])
    assert not verdict.accepted and verdict.reason is RejectReason.LLM


def test_cli_with_ollama_down_is_one_clear_error(tmp_path: Path, stanford_root: Path) -> None:
    """`carsearch augment --generator ollama` with nothing listening: a CarsearchError."""
    from typer.testing import CliRunner

    from carsearch.cli.augment import augment_command
    from carsearch.platform.settings import Settings

    root = stanford_root
    host = f"http://127.0.0.1:{closed_port()}"
    app = typer.Typer()

    @app.callback()
    def _root(ctx: typer.Context) -> None:
        ctx.obj = Settings(data_dir=tmp_path, ollama_host=host)

    app.command("augment")(augment_command)
    result = CliRunner().invoke(app, ["augment", "--root", str(root), "--out",
                                      str(tmp_path / "q.jsonl"), "--generator", "ollama",
                                      "--limit", "3"])
    assert isinstance(result.exception, OllamaUnavailableError)
    assert f"cannot reach the Ollama server at {host}" in str(result.exception)
