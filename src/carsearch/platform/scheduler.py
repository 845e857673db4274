"""The platform's scheduler: the supervised loops every long-running process runs its work on.

A loop is started through :func:`supervise`, which keeps it alive: an exception in a
round is logged with its trace, the loop waits with exponential backoff (1, 2, 4 ... s,
capped) and goes on; its state (running, backoff, stopped, dead) lives in a
:class:`LoopState`. A loop that has not finished a round for ``stale_after_s`` is
stalled. :func:`run_every` is the scheduled form (`drift run --every`, `evaluate ann
--every`, `serve --drift-every`); :func:`install_stop_handlers` is the one place SIGINT
and SIGTERM are turned into a stop event; :class:`BackgroundJobs` runs loops on threads of
one process (the page's background jobs).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from carsearch.platform.errors import CarsearchError

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
_LIVE_STATES = {"starting", "running", "idle", "backoff"}


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class LoopState:
    """What one background loop is doing; changed only through its methods."""

    name: str
    interval_s: float = 0.0
    state: str = "starting"
    failures: int = 0  # consecutive
    total_failures: int = 0
    rounds: int = 0
    last_error: str | None = None
    paused: str | None = None  # why the loop holds back its work (it still runs)
    started_at: float = field(default_factory=time.time)
    last_ok_at: float | None = None
    updated_at: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    on_change: Callable[[LoopState], None] | None = field(default=None, repr=False)

    def _set(self, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self, key, value)
            self.updated_at = time.time()
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:  # recording the state must never take the loop down
                log.debug("recording the state of loop %s failed", self.name, exc_info=True)

    def ok(self) -> None:
        self._set(state="running", failures=0, rounds=self.rounds + 1, last_ok_at=time.time())

    def idle(self) -> None:
        self._set(state="idle")

    def failed(self, exc: BaseException) -> float:
        """Record a failed round; returns how long to back off."""
        failures = self.failures + 1
        self._set(state="backoff", failures=failures, total_failures=self.total_failures + 1,
                  last_error=f"{type(exc).__name__}: {exc}"[:2000])
        return min(MAX_BACKOFF_S, 2.0 ** (failures - 1))

    def pause(self, reason: str) -> None:
        """The loop runs but holds back its work for a lasting reason (the ingest worker
        claims nothing while the image store is full, say)."""
        if self.paused != reason:
            self._set(paused=reason[:2000])

    def resume(self) -> None:
        if self.paused is not None:
            self._set(paused=None)

    def stopped(self) -> None:
        self._set(state="stopped")

    def dead(self, reason: str) -> None:
        self._set(state="dead", last_error=reason[:2000])

    def stale_after_s(self) -> float:
        """How long without a finished round before the loop counts as stalled."""
        return max(300.0, 3.0 * self.interval_s + MAX_BACKOFF_S)

    def healthy(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if self.state not in _LIVE_STATES:
            return self.state == "stopped"
        last = self.last_ok_at or self.started_at
        return self.state == "idle" or now - last <= self.stale_after_s()

    def to_dict(self) -> dict[str, Any]:
        def iso(ts: float | None) -> str | None:
            return datetime.fromtimestamp(ts, UTC).isoformat() if ts else None

        return {"name": self.name, "state": self.state, "healthy": self.healthy(),
                "failures": self.failures, "total_failures": self.total_failures,
                "rounds": self.rounds, "last_error": self.last_error,
                "paused": self.paused,
                "started_at": iso(self.started_at), "last_ok_at": iso(self.last_ok_at),
                "interval_s": self.interval_s}


def supervise(
    state: LoopState,
    step: Callable[[], object],
    *,
    interval_s: float,
    stop: threading.Event,
    first_wait_s: float = 0.0,
    max_rounds: int | None = None,
) -> int:
    """Run ``step`` every ``interval_s`` seconds until ``stop`` is set (or ``max_rounds``).

    Any exception in a round is logged with its trace and answered with exponential
    backoff; the loop goes on. Returns the number of rounds that ran.
    """
    state.interval_s = interval_s
    rounds = 0
    if first_wait_s > 0:
        state.idle()
        stop.wait(first_wait_s)
    while not stop.is_set():
        try:
            step()
        except Exception as exc:
            wait = state.failed(exc)
            if isinstance(exc, CarsearchError):
                log.error("%s: %s (retrying in %.0f s)", state.name, exc, wait)
            else:
                log.exception("%s failed (retrying in %.0f s)", state.name, wait)
        else:
            state.ok()
            wait = interval_s
        rounds += 1
        if max_rounds is not None and rounds >= max_rounds:
            break
        stop.wait(wait)
    state.stopped()
    return rounds


def install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM set ``stop`` (in the main thread; elsewhere nothing is installed).
    Returns a function that puts the previous handlers back."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def _handler(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping after the current round", signum)
        stop.set()

    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def run_every(
    job: Callable[[], object],
    every_s: float,
    *,
    max_runs: int | None = None,
    stop: threading.Event | None = None,
    state: LoopState | None = None,
    first_wait_s: float = 0.0,
) -> int:
    """Run ``job`` now and then every ``every_s`` seconds until SIGINT/SIGTERM (or ``stop``
    is set, or ``max_runs`` runs), as a supervised loop: a failing run is logged and
    retried with backoff, and the loop goes on. Returns the number of runs."""
    if every_s <= 0:
        raise CarsearchError("the interval must be positive")
    stop = stop or threading.Event()
    restore = install_stop_handlers(stop)
    try:
        return supervise(state or LoopState("scheduled job", interval_s=every_s), job,
                         interval_s=every_s, stop=stop, first_wait_s=first_wait_s,
                         max_rounds=max_runs)
    finally:
        restore()


class LoopRegistry(Protocol):
    """Where a process keeps its loops' states (monitoring.health.Health)."""

    def loop(self, name: str, interval_s: float = 0.0) -> LoopState: ...


class BackgroundJobs:
    """Jobs on threads of one long-running process (the page's, `serve --ingest
    --drift-every`), sharing its Platform: one Milvus Lite client, one encoder, and writes
    that reach the search mirror at once. Each job is a supervised loop whose state
    ``health`` keeps; a thread that ends without being asked to is marked dead (the
    health check and the Status tab show it)."""

    def __init__(self, health: LoopRegistry) -> None:
        self.health = health
        self.threads: list[threading.Thread] = []
        self.stoppers: list[Callable[[], None]] = []
        self.stopping = threading.Event()

    def start(self, name: str, target: Callable[[LoopState], object],
              stop: Callable[[], None], interval_s: float = 0.0) -> LoopState:
        state = self.health.loop(name, interval_s)

        def run() -> None:
            try:
                target(state)
            except BaseException as exc:  # a job must not take the page down with it
                log.exception("background job %s stopped with an error", name)
                state.dead(f"{type(exc).__name__}: {exc}")
                return
            if not self.stopping.is_set():
                log.error("background job %s ended without being stopped", name)
                state.dead("the loop ended without being stopped")

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(thread)
        self.stoppers.append(stop)
        thread.start()
        return state

    def stop(self) -> None:
        """Ask every job to finish what it is doing, then wait for them."""
        self.stopping.set()
        for stop in self.stoppers:
            stop()
        for thread in self.threads:
            thread.join(timeout=120)
