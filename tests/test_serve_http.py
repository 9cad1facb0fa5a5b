"""`cace-server serve` over HTTP as a process: slow clients, signals, bounded shutdown.

Each test starts a real server process on a free 127.0.0.1 port (the bundled water
model), talks to it through raw sockets that stop in the middle of a request, and
sends it real signals.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CLI = [sys.executable, "-m", "cace_server.cli"]
WATER = {"symbols": ["O", "H", "H"], "positions": [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, tmp_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--port", str(self.port), "--log-json", *flags],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(self.log())

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def messages(self) -> list[str]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line)["message"])
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def start(servers: list[ServerProcess], tmp_path: Path, *flags: str) -> ServerProcess:
    server = ServerProcess(tmp_path, *flags)
    servers.append(server)
    server.wait_ready()
    return server


def raw(server: ServerProcess, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; raises TimeoutError if it does not."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    received = b""
    while True:
        chunk = sock.recv(65536)  # socket.timeout (a TimeoutError) if the server holds on
        if not chunk:
            return received, time.monotonic() - t0
        received += chunk


HALF_HEAD = b"POST /v1/calculate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"
HALF_BODY = (
    b"POST /v1/calculate HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n" + b'{"symbols": ["O", '
)


def test_stalled_clients_are_dropped_after_the_read_timeouts(servers, tmp_path) -> None:
    server = start(servers, tmp_path, "--header-timeout-s", "1", "--body-timeout-s", "1")
    silent = raw(server, b"")
    half_head = raw(server, HALF_HEAD)
    half_body = raw(server, HALF_BODY)
    for sock, answer in ((silent, b""), (half_head, b"HTTP/1.1 408"), (half_body, b"HTTP/1.1 408")):
        received, _ = read_until_closed(sock, timeout=20)
        assert received.startswith(answer), received
        sock.close()
    # Dripping a header byte at a time does not reset the head's deadline.
    drip = raw(server, b"GET /healthz HTTP/1.1\r\n")
    t0 = time.monotonic()
    with pytest.raises(OSError):  # the server closes: a write or the read fails
        for _ in range(100):
            drip.sendall(b"X")
            drip.settimeout(0.2)
            try:
                if drip.recv(65536) == b"":
                    raise ConnectionResetError("closed by the server")
            except TimeoutError:
                pass
    assert time.monotonic() - t0 < 15
    drip.close()
    # A client that keeps its body coming is not dropped, and the server is fine.
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.head("/healthz").status_code == 200
        assert client.post("/v1/calculate", json=WATER).status_code == 200
    assert "closing the connection of 127.0.0.1" in "\n".join(server.messages())


def test_sigterm_with_a_stalled_client_exits_0_after_the_deadline(servers, tmp_path) -> None:
    server = start(
        servers,
        tmp_path,
        "--header-timeout-s", "600", "--body-timeout-s", "600", "--shutdown-timeout-s", "1",
    )  # fmt: skip
    stalled = [raw(server, HALF_BODY), raw(server, HALF_HEAD)]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/v1/calculate", json=WATER).status_code == 200
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=40) == 0, server.log()
    messages = "\n".join(server.messages())
    assert "closing 1 HTTP connection(s) still open 1 s" in messages, messages
    assert "stopped" in messages
    for sock in stalled:
        sock.close()


def test_a_second_signal_exits_at_once(servers, tmp_path) -> None:
    server = start(servers, tmp_path, "--body-timeout-s", "600", "--shutdown-timeout-s", "600")
    stalled = raw(server, HALF_BODY)
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert server.proc.poll() is None, "the stalled client should hold the first shutdown"
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=15) == 128 + signal.SIGINT, server.log()
    assert any(m.startswith("second SIGINT: exiting now") for m in server.messages())
    stalled.close()


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc), including reparented ones seen
    before their parent died: call it while ``pid`` is alive."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_killed_server_leaves_no_process_behind(servers, tmp_path) -> None:
    server = start(servers, tmp_path)
    # the JSON parser's fork server and its worker start with the app
    deadline = time.monotonic() + 30
    while len(left := descendants(server.proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(left) >= 2, left
    server.proc.kill()
    server.proc.wait(10)
    deadline = time.monotonic() + 15
    while any(alive(p) for p in left) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in left if alive(p)], "processes outlived the killed server"
