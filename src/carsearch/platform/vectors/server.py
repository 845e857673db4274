"""A Milvus standalone server on this machine, for tests, benchmarks and the chaos run.

The PyPI package ``milvus`` (2.3.5) ships the Milvus standalone binary behind a small
Python launcher, ``milvus-server --data DIR``. The launcher binds a fixed default port
for every component unless told otherwise, and the embedded etcd listens on 2379/2380
whatever ``--etcd-port`` says, so two servers on one machine collide. So
:class:`LocalMilvusServer` picks free ports for every component, gives the embedded etcd
its own config file (``ETCD_CONFIG_PATH``, which Milvus reads as ``etcd.config.path``)
with free client and peer ports, starts the launcher in its own process group, waits
until a client can list collections, and stops the whole group. (The launcher finds a
free metrics port itself, from 9091 up.) SIGTERM did not end the server
within 45 s in a measurement here, so :meth:`LocalMilvusServer.stop` sends SIGTERM, waits
briefly, then SIGKILLs the group: nothing is left running. A stopped server can be started
again on the same data directory and ports (the chaos run restarts it); the start then
waits for the old connections' TIME_WAIT to pass (up to a minute), because the launcher
would otherwise move to other ports without saying so.

``authorization=True`` starts it with authentication on (``common.security.
authorizationEnabled``, the launcher's ``--authorization-enabled``), as docker-compose runs
Milvus: every client then needs a token. The 2.3 binary creates ``root`` with the password
``Milvus`` (2.4.7+ takes another from ``common.security.defaultRootPassword``, which
docker-compose sets from a secret); ``token`` is what this class itself connects with
while it waits for the server, ``root:Milvus`` unless told otherwise.

In production Milvus runs as its own service (docker-compose); nothing in the platform's
request paths starts a server.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from carsearch.platform.errors import CarsearchError

log = logging.getLogger(__name__)

# Every listening component of the standalone binary, as the launcher names its options.
PORT_OPTIONS = (
    "proxy-port", "proxy-internal-port", "etcd-port", "root-coord-port",
    "query-coord-port", "query-node-port", "index-coord-port", "index-node-port",
    "data-coord-port", "data-node-port",
)


# Rows not yet sealed (growing segments, up to ~118 MB a shard) are searched through
# Milvus's interim IVF index (`queryNode.segcore.interimIndex`, nlist 128) at this nprobe,
# whatever HNSW's ef says. Milvus's own default, 16, measured recall@10 0.953 for a
# trained model's held-out text queries over 50,000 growing rows; 64 measured 0.999
# (docs/BENCHMARKS.md, "The search ef and the interim index's nprobe"). Every server
# this module starts uses it; docker-compose.yml and deploy/milvus/values.yaml set the
# same value (tests/test_compose.py checks that they agree).
INTERIM_INDEX_NPROBE = 64
SERVER_CONFIG: dict[str, str | int | float | bool] = {
    "queryNode.segcore.interimIndex.nprobe": INTERIM_INDEX_NPROBE,
}

# The password Milvus gives root when nothing else is configured (never used in
# docker-compose, which sets root's password from a secret).
DEFAULT_ROOT_TOKEN = "root:Milvus"


class MilvusServerError(CarsearchError):
    """The local Milvus server could not be started."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launcher() -> str:
    """The ``milvus-server`` launcher beside this interpreter, or on PATH."""
    beside = Path(sys.executable).with_name("milvus-server")
    if beside.is_file():
        return str(beside)
    found = shutil.which("milvus-server")
    if found is None:
        raise MilvusServerError(
            "milvus-server is not installed: pip install milvus (the project's dev extra)"
        )
    return found


class LocalMilvusServer:
    """One ``milvus-server`` process group on free loopback ports with its own data dir."""

    def __init__(self, data_dir: Path, *, start_timeout_s: float = 120.0,
                 authorization: bool = False, token: str = "",
                 extra_config: dict[str, str | int | float | bool] | None = None) -> None:
        self.data_dir = Path(data_dir)
        # milvus.yaml keys (dotted) and values the launcher writes over its template:
        # SERVER_CONFIG, then the caller's.
        self.extra_config = {**SERVER_CONFIG, **(extra_config or {})}
        self.start_timeout_s = start_timeout_s
        self.authorization = authorization
        self.token = token or (DEFAULT_ROOT_TOKEN if authorization else "")
        ports = free_ports(len(PORT_OPTIONS) + 1)
        self.ports = dict(zip(PORT_OPTIONS, ports[:-1], strict=True))
        self.etcd_peer_port = ports[-1]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "milvus-server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy-port']}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        cmd = [launcher(), "--data", str(self.data_dir)]
        for option, port in self.ports.items():
            cmd += [f"--{option}", str(port)]
        if self.authorization:
            cmd += ["--authorization-enabled", "true"]
        for key, value in self.extra_config.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            cmd += ["--extra-config", f"{key}={text}"]
        return cmd

    def start(self) -> str:
        """Start the server and wait until it answers; returns its URI."""
        if self.running:
            return self.uri
        self._wait_ports_free()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "ETCD_CONFIG_PATH": str(self._write_etcd_config())}
        with _start_lock():  # the launcher's own metrics-port pick is not atomic
            with self.log_path.open("ab") as out:
                self.proc = subprocess.Popen(
                    self.command(), stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                )
            try:
                self._wait_ready()
            except BaseException:
                self.stop()
                raise
        log.info("Milvus server %s ready (pid %d, data %s)", self.uri, self.proc.pid,
                 self.data_dir)
        return self.uri

    def _wait_ports_free(self, timeout_s: float = 120.0) -> None:
        """Wait until the launcher can bind every port again. After a stop the server's
        side of each connection sits in TIME_WAIT for up to a minute, and the launcher
        (which binds without SO_REUSEADDR to test a port) then silently moves to the next
        port, so a restarted server would answer somewhere its clients do not look."""
        deadline = time.monotonic() + timeout_s
        busy = self._busy_ports()
        while busy and time.monotonic() < deadline:
            time.sleep(1.0)
            busy = self._busy_ports()
        if busy:
            raise MilvusServerError(f"ports {busy} are still in use; cannot start on them")

    def _busy_ports(self) -> list[int]:
        busy = []
        for port in [*self.ports.values(), self.etcd_peer_port]:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    busy.append(port)
        return busy

    def _write_etcd_config(self) -> Path:
        """The embedded etcd's own config: loopback client and peer URLs on our ports."""
        client = f"http://127.0.0.1:{self.ports['etcd-port']}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        path = self.data_dir / "embed-etcd.yaml"
        path.write_text(
            "name: carsearch-milvus\n"
            f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
            f"initial-cluster: carsearch-milvus={peer}\n"
        )
        return path

    def _wait_ready(self) -> None:
        from pymilvus import MilvusClient

        deadline = time.monotonic() + self.start_timeout_s
        last: Exception | None = None
        port = self.ports["proxy-port"]
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise MilvusServerError(
                    f"milvus-server exited with {self.proc.returncode} during start; "
                    f"see {self.log_path}: {self._log_tail()}"
                )
            time.sleep(0.5)
            try:  # the proxy port first: a client would log every refused connection
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                client = MilvusClient(uri=self.uri, token=self.token, timeout=5)
                try:
                    client.list_collections()
                finally:
                    client.close()
                return
            except Exception as exc:  # not up yet
                last = exc
        raise MilvusServerError(
            f"milvus-server did not answer on {self.uri} within {self.start_timeout_s:g} s "
            f"({last}); see {self.log_path}"
        )

    def _log_tail(self, n: int = 400) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def stop(self, *, grace_s: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``, and wait until no
        process of the group is left (the launcher and the server binary it started)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        _wait_group(proc, grace_s)
        _signal_group(proc.pid, signal.SIGKILL)
        if not _wait_group(proc, 30.0):
            log.warning("Milvus server process group %d did not go away", proc.pid)
        log.info("Milvus server %s stopped", self.uri)

    def kill(self) -> None:
        """SIGKILL the server at once (a crash, for the chaos run)."""
        self.stop(grace_s=0.0)

    def restart(self) -> str:
        self.stop()
        return self.start()

    def __enter__(self) -> LocalMilvusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _start_lock() -> Iterator[None]:
    """One server start at a time on this machine (an exclusive lock on a file in the
    temporary directory; released by the kernel if this process dies). Where the file
    cannot be opened (another user's), the start goes on unserialised."""
    path = Path(tempfile.gettempdir()) / "carsearch-milvus-server-start.lock"
    try:
        fh = path.open("a")
    except OSError as exc:
        log.debug("no Milvus start lock at %s: %s", path, exc)
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _wait_group(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait until no process of ``proc``'s group is alive; False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        proc.poll()  # reap the launcher, so that a zombie does not count as alive
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
