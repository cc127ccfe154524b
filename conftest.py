"""Shared helpers and fixtures of the Mesh Gateway tests: real servers (in-process uvicorn, or
`python gateway.py` processes), real redis-servers, and clients that talk to them.

- `running(settings)`: the gateway on an in-process uvicorn server; `Gate` is its test handle.
- `process(folder)` / `cluster(folder)`: whole `python gateway.py` processes (three share a Redis).
- the `gate` fixture: the same scenario on one process and on a three-process cluster.
- `Node` (a websockets client) and `RawNode` (a sans-io client whose pongs the test controls).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.uri import parse_uri

import gateway as gw
from gateway import Settings

HERE = Path(__file__).parent
FIXTURE = HERE / "fixtures" / "node-session.jsonl"  # a copy of shared/fixtures: a real session
TIMEOUT = 5.0


MESSAGE = {
    "type": "new_message",
    "message": {
        "id": "m1",
        "roomId": "r1",
        "roomName": "general",
        "senderId": "u1",
        "senderName": "alice",
        "content": "hello",
        "isDm": False,
        "createdAt": "2026-11-28T00:00:00.000Z",
        "trustLevel": "local",
        "secretField": "dropped",
    },
    "extra": "dropped",
}


# --- Servers under test -----------------------------------------------------------------------


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Defaults, but registrations from this one test client are not rate limited (tests that
    check that limit set it)."""
    overrides = {"register_per_min": 100_000} | overrides
    return Settings(db_path=str(tmp_path / "gateway.db"), registry_path=str(tmp_path / "registry.json"), **overrides)


@contextlib.asynccontextmanager
async def serve(app: Any, settings: Settings) -> AsyncIterator[str]:
    """Run `app` on a real uvicorn server on an ephemeral loopback port; yield host:port."""
    options = gw.uvicorn_options(settings) | {"host": "127.0.0.1", "port": 0, "log_level": "warning", "loop": "none"}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(TIMEOUT):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("server exited before starting")
                await asyncio.sleep(0.005)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(TIMEOUT * 2):
            await task


class Node:
    """A test mesh node: one WebSocket client with frame helpers."""

    def __init__(self, ws: ClientConnection, mesh_id: str = "") -> None:
        self.ws = ws
        self.mesh_id = mesh_id

    async def send(self, **frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return json.loads(await self.ws.recv())

    async def expect(self, type_: str, **fields: Any) -> dict[str, Any]:
        frame = await self.recv()
        assert frame["type"] == type_, frame
        for key, value in fields.items():
            assert frame.get(key) == value, frame
        return frame

    async def error(self, code: str, **fields: Any) -> dict[str, Any]:
        return await self.expect("error", code=code, **fields)

    async def discover(self) -> list[dict[str, Any]]:
        await self.send(type="gateway_discover")
        return (await self.expect("gateway_discover_result"))["instances"]

    async def quiet(self) -> None:
        """Prove nothing else is queued for this node: a discover answer comes next."""
        await self.send(type="gateway_discover")
        await self.expect("gateway_discover_result")

    async def closed(self) -> websockets.frames.Close:
        async with asyncio.timeout(TIMEOUT):
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    await self.ws.recv()
        assert self.ws.close_code is not None
        return websockets.frames.Close(self.ws.close_code, self.ws.close_reason or "")


class Gate:
    """A running gateway under test (one process, or several sharing Redis):
    an HTTP client and a node factory. With several processes, registrations and
    connections go to each process in turn, so every scenario crosses processes."""

    def __init__(self, addrs: list[str], http: httpx.AsyncClient, prefix: str = "") -> None:
        self.addrs = addrs
        self.addr = addrs[0]
        self.http = http
        self.prefix = prefix
        self.cluster = len(addrs) > 1
        self.stack = contextlib.AsyncExitStack()
        self._turn = itertools.count()

    def next_addr(self) -> str:
        return self.addrs[next(self._turn) % len(self.addrs)]

    async def register(
        self, mesh_id: str, secret: str | None = None, name: str | None = None, **extra: Any
    ) -> httpx.Response:
        body = {"meshId": mesh_id, "secret": secret or f"secret-{mesh_id}", "name": name or f"Mesh {mesh_id}"} | extra
        return await self.http.post(f"http://{self.next_addr()}{self.prefix}/register", json=body)

    async def connect(
        self, *, rcvbuf: int | None = None, addr: str | None = None, headers: dict[str, str] | None = None
    ) -> Node:
        addr = addr or self.next_addr()
        sock = None
        if rcvbuf is not None:  # a small receive buffer: the kernel cannot hide a stalled reader
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            host, port = addr.split(":")
            sock.connect((host, int(port)))
        url = f"ws://{addr}{self.prefix}/gateway"
        ws = await self.stack.enter_async_context(
            connect(url, open_timeout=TIMEOUT, sock=sock, max_size=None, additional_headers=headers)
        )
        return Node(ws)

    async def node(
        self,
        mesh_id: str,
        participants: list[dict[str, str]] | None = None,
        *,
        rcvbuf: int | None = None,
        addr: str | None = None,
        **auth: Any,
    ) -> Node:
        """Register (if new), connect and authenticate a mesh."""
        response = await self.register(mesh_id)
        assert response.status_code == 200, response.text
        node = await self.connect(rcvbuf=rcvbuf, addr=addr)
        node.mesh_id = mesh_id
        frame: dict[str, Any] = {"meshId": mesh_id, "secret": f"secret-{mesh_id}"} | auth
        if participants is not None:
            frame["participants"] = participants
        await node.send(type="gateway_auth", **frame)
        await node.expect("gateway_auth_ok", meshId=mesh_id, name=f"Mesh {mesh_id}")
        if self.cluster:
            await self.agree()
        return node

    async def healths(self, *, healthy: bool = True) -> list[dict[str, Any]]:
        responses = [await self.http.get(f"http://{addr}{self.prefix}/health") for addr in self.addrs]
        if healthy:
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json() for r in responses]

    async def health(self) -> dict[str, Any]:
        """One process: its /health. Several: meshes connected on all of them."""
        healths = await self.healths()
        return {"ok": all(h["ok"] for h in healths), "connected": sum(h["connected"] for h in healths)}

    async def agree(self) -> None:
        """Wait until every process's view counts every mesh connected anywhere."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                healths = await self.healths(healthy=False)
                total = sum(h["connected"] for h in healths)
                if all(h["ok"] and h["clusterConnected"] == total for h in healths):
                    return
                await asyncio.sleep(0.01)

    async def wait_connected(self, count: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while (await self.health())["connected"] != count:
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(settings: Settings, app: Any = None, prefix: str = "") -> AsyncIterator[Gate]:
    app = app or gw.serving_app(gw.Gateway(settings))  # what `python gateway.py` serves
    async with serve(app, settings) as addr, httpx.AsyncClient(base_url=f"http://{addr}", timeout=TIMEOUT) as http:
        gate = Gate([addr], http, prefix)
        async with gate.stack:
            yield gate


# --- Whole processes and Redis ----------------------------------------------------------------


PORTS_PER_WORKER = 2000
next_port = itertools.count()


def free_port() -> int:
    """A free loopback port from this test worker's own range, below the kernel's ephemeral range.
    (Port 0 then close is a race: two xdist workers were handed the same port, and one cluster's
    health check was answered by the other's process.)"""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    base = 10_000 + PORTS_PER_WORKER * (worker % 10)
    for _ in range(PORTS_PER_WORKER):
        port = base + next(next_port) % PORTS_PER_WORKER
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}-{base + PORTS_PER_WORKER}")


Started = tuple[subprocess.Popen[bytes], str]  # a gateway process and its host:port


def start_gateways(folder: Path, count: int = 1, **env: str) -> list[Started]:
    """`count` processes of `python gateway.py` as users run it, started at once; returns when
    every /health answers 200 (blocking: the servers are other processes)."""
    started, logs = [], []
    for _ in range(count):
        port = free_port()
        full_env = os.environ | {
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "REGISTRY_PATH": str(folder / "registry.json"),
            "DB_PATH": str(folder / "gateway.db"),
            "REGISTER_PER_MIN": "100000",  # one test client registers many meshes
        }
        log = folder / f"gateway-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "gateway.py")], env=full_env | env, stdout=out, stderr=subprocess.STDOUT
            )
        started.append((proc, f"127.0.0.1:{port}"))
        logs.append(log)
    deadline = time.monotonic() + 15
    for (proc, addr), log in zip(started, logs, strict=True):
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://{addr}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"{addr} not up in 15 s: {log.read_text()}"
            time.sleep(0.05)
    return started


def kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@contextlib.asynccontextmanager
async def process(tmp_path: Path, **env: str) -> AsyncIterator[Started]:
    """One `python gateway.py`; yields the process and host:port once /health answers."""
    [(proc, addr)] = await asyncio.to_thread(start_gateways, tmp_path, 1, **env)
    try:
        yield proc, addr
    finally:
        kill([proc])


class RedisServer:
    """A real redis-server on a free loopback port, with an append-only file in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and return once it answers PING (blocking: it is another process)."""
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "yes", "--dir", str(self.folder)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + TIMEOUT
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    client.close()
                    return
            assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
            time.sleep(0.02)

    def flush(self) -> None:
        with redis.Redis(port=self.port, socket_timeout=TIMEOUT) as client:
            client.flushall()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=TIMEOUT)


@contextlib.asynccontextmanager
async def redis_server(folder: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


CLUSTER_ENV = {"PRESENCE_TTL_S": "2", "RATE_LIMIT_PER_MIN": "100000"}


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path, size: int = 3, **env: str
) -> AsyncIterator[tuple[Gate, RedisServer, list[subprocess.Popen[bytes]]]]:
    """`size` gateway processes sharing one real redis-server, for a test that needs its own."""
    async with redis_server(tmp_path) as redis:
        started = await asyncio.to_thread(start_gateways, tmp_path, size, **CLUSTER_ENV, REDIS_URL=redis.url, **env)
        try:
            async with httpx.AsyncClient(base_url=f"http://{started[0][1]}", timeout=TIMEOUT) as http:
                gate = Gate([addr for _, addr in started], http)
                async with gate.stack:
                    yield gate, redis, [proc for proc, _ in started]
        finally:
            kill([proc for proc, _ in started])


class SharedCluster:
    """Three processes and one redis-server for every `gate[cluster]` scenario of a module:
    starting them costs over a second, which each of 33 scenarios paid. `reset` makes them as
    good as new between tests: every mesh gone, Redis empty, no mailbox left."""

    # Their per-mesh buckets and per-IP throttles outlive a test: no scenario here tests those
    # limits (tests of their own do, on a process of their own), so they stay out of the way.
    ENV = CLUSTER_ENV | {"UPDATE_RATE_PER_MIN": "100000", "AUTH_FAILURES_PER_MIN": "100000"}

    def __init__(self, folder: Path) -> None:
        self.redis = RedisServer(folder)
        self.redis.start()
        self.started = start_gateways(folder, 3, **self.ENV, REDIS_URL=self.redis.url)
        self.addrs = [addr for _, addr in self.started]

    async def reset(self, gate: Gate) -> None:
        await gate.wait_connected(0)
        await gate.agree()  # every process has seen every mesh leave
        self.redis.flush()  # registry, presence, mailboxes: what the next scenario reads comes from Redis

    def close(self) -> None:
        kill([proc for proc, _ in self.started])
        self.redis.stop()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedCluster]:
    shared = SharedCluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture(params=["single", "cluster"])
async def gate(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Gate]:
    """The same scenario on one process, and on three processes sharing Redis."""
    if request.param == "single":
        async with running(make_settings(tmp_path)) as gate:
            yield gate
        return
    shared: SharedCluster = request.getfixturevalue("shared_cluster")
    async with httpx.AsyncClient(base_url=f"http://{shared.addrs[0]}", timeout=TIMEOUT) as http:
        gate = Gate(shared.addrs, http)
        try:
            async with gate.stack:
                yield gate
        finally:
            await shared.reset(gate)


# --- Offline delivery: a node whose pongs the test holds, a proxy that freezes ----------------


class RawNode:
    """A node whose pongs the test controls (the websockets library answers pings by itself):
    while `holding`, everything it would send (its pongs) waits. Like the reference node, it
    handles frames in order and pongs after them, so a pong confirms every frame before its ping:
    `handled` holds those, `pending` what arrived after the last ping it answered."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: ClientProtocol) -> None:
        self.reader, self.writer, self.protocol = reader, writer, protocol
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.handled: list[dict[str, Any]] = []  # confirmed by a pong that left
        self.pending: list[dict[str, Any]] = []  # arrived after the last ping answered
        self.unanswered: list[dict[str, Any]] = []  # arrived before a ping still held back
        self.holding = False
        self.held = b""
        self.closed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, gate: Gate, addr: str | None = None) -> RawNode:
        addr = addr or gate.addr
        host, port = addr.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        protocol = ClientProtocol(parse_uri(f"ws://{addr}/gateway"), max_size=None)
        protocol.send_request(protocol.connect())
        node = cls(reader, writer, protocol)
        gate.stack.push_async_callback(node.aclose)
        node._flush()
        async with asyncio.timeout(TIMEOUT):
            await node.opened
        return node

    async def auth(self, mesh_id: str, **extra: Any) -> dict[str, Any]:
        await self.send(type="gateway_auth", meshId=mesh_id, secret=f"secret-{mesh_id}", **extra)
        return await self.expect("gateway_auth_ok")

    async def send(self, **frame: Any) -> None:
        self.protocol.send_text(json.dumps(frame).encode())
        self._flush()

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return await self.frames.get()

    async def expect(self, type_: str, **fields: Any) -> dict[str, Any]:
        frame = await self.recv()
        assert frame["type"] == type_ and all(frame.get(k) == v for k, v in fields.items()), frame
        return frame

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        """Send the held pongs: everything before the last ping received is now confirmed."""
        self.holding = False
        self.handled += self.unanswered
        self.unanswered = []
        self._flush()

    async def aclose(self) -> None:
        self.writer.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await self.task

    async def answer(self, frame_id: str) -> dict[str, Any]:
        """The gateway's answer (ack or error) to our frame `frame_id`; other frames are skipped."""
        while True:
            frame = await self.recv()
            if frame.get("id") == frame_id:
                return frame

    async def quiesce(self) -> None:
        """Stop answering pings, and be sure the pongs already sent have arrived: `handled` is exact."""
        await self.send(type="gateway_discover")  # behind every pong sent so far
        self.hold()
        while (await self.recv())["type"] != "gateway_discover_result":
            pass

    def kill(self) -> None:
        """The node's process dies: no close frame, a TCP reset."""
        self.writer.transport.abort()

    async def close(self, *, drop_pongs: bool = False) -> None:
        if drop_pongs:
            self.holding, self.held, self.unanswered = False, b"", []
        self.protocol.send_close(1000)
        self._flush()
        async with asyncio.timeout(TIMEOUT):
            await self.closed

    def _flush(self) -> None:
        data = b"".join(self.protocol.data_to_send())
        if self.holding:
            self.held += data
        elif data or self.held:
            self.writer.write(self.held + data)
            self.held = b""

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                self.protocol.receive_data(data)
                for event in self.protocol.events_received():
                    self._event(event)
                self._flush()
        except OSError:
            pass
        finally:
            code = self.protocol.close_rcvd.code if self.protocol.close_rcvd else 1006
            if not self.closed.done():
                self.closed.set_result(code)

    def _event(self, event: Any) -> None:
        if not isinstance(event, websockets.frames.Frame):  # the handshake's response
            self.opened.set_result(None)
            return
        if event.opcode is websockets.frames.Opcode.CLOSE:  # its answer goes now; held pongs never will
            self.holding, self.held, self.unanswered = False, b"", []
        elif event.opcode is websockets.frames.Opcode.PING:  # its pong is queued after everything before it
            (self.unanswered if self.holding else self.handled).extend(self.pending)
            self.pending = []
        elif event.opcode is websockets.frames.Opcode.TEXT:
            frame = json.loads(event.data)
            if frame["type"] == "gateway_incoming":
                self.pending.append(frame)
            self.frames.put_nowait(frame)


class FreezableProxy:
    """A loopback TCP proxy that can stop forwarding in both directions without closing
    anything: a network that freezes, no FIN, no RST."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def freeze(self) -> None:
        self.flowing.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.target.split(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        self.writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self.tasks.add(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                await self.flowing.wait()
                sink.write(data)


def kept_rows(folder: Path) -> int:
    with contextlib.closing(sqlite3.connect(folder / "gateway.db")) as db:
        return db.execute("SELECT count(*) FROM kept").fetchone()[0]


def offline_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return make_settings(tmp_path, confirm_interval_s=0.05, rate_limit_per_min=100_000, **overrides)


def contents(frames: list[dict[str, Any]]) -> list[Any]:
    return [f["payload"]["message"] for f in frames]


async def relay_all(sender: Node, target: str, messages: range, **ack: Any) -> None:
    """Relay numbered messages and wait for each ack (so the gateway accepted them in this order)."""
    for n in messages:
        await sender.send(type="gateway_relay", targetMeshId=target, payload={"type": "m", "message": n}, id=f"r{n}")
        await sender.expect("gateway_ack", id=f"r{n}", **ack)


async def returning(gate: Gate, mesh_id: str, count: int) -> tuple[Node, list[dict[str, Any]]]:
    """The mesh connects again; its `count` kept frames come right after gateway_auth_ok."""
    node = await gate.connect()
    await node.send(type="gateway_auth", meshId=mesh_id, secret=f"secret-{mesh_id}")
    await node.expect("gateway_auth_ok", meshId=mesh_id)
    node.mesh_id = mesh_id
    return node, [await node.expect("gateway_incoming") for _ in range(count)]


async def away(gate: Gate, mesh_id: str) -> None:
    """A mesh that authenticated once and left."""
    node = await gate.node(mesh_id)
    connected = (await gate.health())["connected"]
    await node.ws.close()
    await gate.wait_connected(connected - 1)


def stored_meshes(folder: Path) -> dict[str, gw.Mesh]:
    """The registry as committed in the database file, read with the stdlib as an operator would."""
    with contextlib.closing(sqlite3.connect(folder / "gateway.db")) as db:
        rows = db.execute("SELECT mesh_id, name, secret_hash, created FROM meshes").fetchall()
    return {row[0]: gw.Mesh(*row) for row in rows}
