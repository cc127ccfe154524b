"""Load generator worker: one process, one role, driven by run.py over pipes.

stdin:  line 1 is the job (JSON); then control lines `go`, `mark`, `stop`.
stdout: JSON event lines: `ready` after setup, `done` when a finite role has
        finished its work, `result` after `stop` (then the process exits).

`go` starts the load, `mark` restarts the measured window (after warm-up),
`stop` ends it: counters, latency samples and this process's CPU time cover
mark..stop. Every wait is bounded; a watchdog exits the process at the job's
deadline whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import uvloop

from wsclient import HttpClient, WsClient, ws_connect

log = logging.getLogger("loadgen")
MAX_SAMPLES = 400_000
MAX_ERRORS = 20

# --- Frames -----------------------------------------------------------------

# A realistic ~300 B chat payload; `content` carries the send time and a sequence number.
_MESSAGE = (
    b'{"type":"new_message","message":{"id":"msg-%010d","roomId":"room-4f1c2a9e","roomName":"general",'
    b'"senderId":"user-8d2e61","senderName":"Alice Example","content":"t=%020d;s=%010d;'
    + b"lorem ipsum dolor sit amet " * 3
    + b'","isDm":false,"createdAt":"2025-06-01T12:00:00.000Z"}}'
)
RELAY = b'{"type":"gateway_relay","targetMeshId":"%s","payload":' + _MESSAGE + b"}"
BROADCAST = b'{"type":"gateway_broadcast","payload":' + _MESSAGE + b"}"


def secret_for(mesh_id: str) -> str:
    return f"bench-secret-{mesh_id}"


def registration(mesh_id: str) -> bytes:
    return json.dumps({"meshId": mesh_id, "secret": secret_for(mesh_id), "name": mesh_id}).encode()


class Msg(msgspec.Struct):
    content: str = ""


class Payload(msgspec.Struct):
    message: Msg = msgspec.field(default_factory=Msg)


class Inbound(msgspec.Struct):
    type: str
    payload: Payload = msgspec.field(default_factory=Payload)
    code: str = ""
    message: str = ""


decode_inbound = msgspec.json.Decoder(Inbound).decode


def parse_content(content: str) -> tuple[int, int]:
    """(send time ns, sequence) from `t=<20 digits>;s=<10 digits>;...`."""
    return int(content[2:22]), int(content[25:35])


# Fast path: both servers put `type` first, so a delivery is recognised, and its
# stamp read, without decoding the JSON (the receivers' hottest line).
INCOMING = b'{"type":"gateway_incoming"'
STAMP = b'"content":"t='


# --- Mesh connection ----------------------------------------------------------


class Stats:
    """Per-process counters shared by every mesh of the worker."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.error_count = 0
        self.closes: dict[str, int] = {}
        self.reconnects = 0

    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(text)


class Mesh:
    def __init__(self, mesh_id: str, stats: Stats) -> None:
        self.id = mesh_id
        self.stats = stats
        self.client: WsClient | None = None
        self.authed: asyncio.Future[None] | None = None
        self.on_incoming: Callable[[int, int], None] | None = None  # (send time ns, sequence)

    async def connect(self, host: str, port: int, *, deflate: bool, timeout: float) -> None:
        self.authed = asyncio.get_running_loop().create_future()
        self.client = await ws_connect(
            host, port, on_message=self.on_message, offer_deflate=deflate, timeout=timeout
        )
        self.client.closed.add_done_callback(self._closed)
        auth = {"type": "gateway_auth", "meshId": self.id, "secret": secret_for(self.id)}
        self.client.send(json.dumps(auth).encode())
        async with asyncio.timeout(timeout):
            await self.authed

    def send(self, data: bytes) -> None:
        assert self.client is not None
        self.client.send(data)

    def on_message(self, data: bytes) -> None:
        if data.startswith(INCOMING) and self.on_incoming is not None and (i := data.find(STAMP)) > 0:
            self.on_incoming(int(data[i + 13 : i + 33]), int(data[i + 36 : i + 46]))
            return
        try:
            self.handle(decode_inbound(data))
        except Exception as exc:  # a bad frame or a bug must show up in the result, not kill the loop
            self.stats.error(f"{self.id}: {exc!r} on {data[:80]!r}")

    def handle(self, frame: Inbound) -> None:
        if frame.type == "gateway_incoming":
            if self.on_incoming is not None:
                self.on_incoming(*parse_content(frame.payload.message.content))
        elif frame.type == "gateway_auth_ok":
            if self.authed is not None and not self.authed.done():
                self.authed.set_result(None)
        elif frame.type in ("gateway_auth_error", "error"):
            self.stats.error(f"{self.id}: {frame.type} {frame.code} {frame.message}")
            if frame.type == "gateway_auth_error" and self.authed is not None and not self.authed.done():
                self.authed.set_exception(ConnectionError(frame.message))

    def _closed(self, _: object) -> None:
        if self.client is not None:
            code = str(self.client.close_code)
            self.stats.closes[code] = self.stats.closes.get(code, 0) + 1
            if self.authed is not None and not self.authed.done():  # fail now, not at the timeout
                self.authed.set_exception(ConnectionError(f"closed ({code}) before auth"))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


# --- Roles --------------------------------------------------------------------


class Role:
    """Base: subclasses fill `setup`, `go`, `finish`; measurement is common."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.host: str = job["host"]
        self.port: int = job["port"]
        self.ports: dict[str, int] = job.get("ports", {})  # mesh id -> its server process, when there are several
        self.stats = Stats()
        self.running = False
        self.meshes: list[Mesh] = []
        self.samples: list[int] = []
        self.count = 0  # deliveries (or operations) inside the measured window
        self.measuring = False
        self.mark_t = self.mark_cpu = 0.0

    def mark(self) -> None:
        self.samples, self.count, self.measuring = [], 0, True
        self.mark_t, self.mark_cpu = time.monotonic(), _cpu()

    def record(self, sent_ns: int) -> None:
        if self.measuring:
            self.count += 1
            if len(self.samples) < MAX_SAMPLES:
                self.samples.append(time.monotonic_ns() - sent_ns)

    async def connect_all(self, meshes: list[Mesh], *, concurrency: int, deflate: bool = False) -> int:
        """Connect and authenticate every mesh; returns how many failed."""
        gate = asyncio.Semaphore(concurrency)
        timeout = float(self.job.get("connect_timeout_s", 30))
        retries = int(self.job.get("retries", 0))

        async def one(mesh: Mesh) -> bool:
            async with gate:
                for attempt in range(retries + 1):
                    try:
                        port = self.ports.get(mesh.id, self.port)
                        await mesh.connect(self.host, port, deflate=deflate, timeout=timeout)
                        return True
                    except (OSError, ConnectionError) as exc:
                        # Refused or reset before the upgrade (a full listen queue): nodes reconnect too.
                        if mesh.client is None and attempt < retries:
                            self.stats.reconnects += 1
                            await asyncio.sleep(0.5)
                            continue
                        self.stats.error(f"{mesh.id}: connect/auth failed: {exc!r}")
                    except TimeoutError as exc:
                        self.stats.error(f"{mesh.id}: connect/auth timed out: {exc!r}")
                    return False
            return False

        results = await asyncio.gather(*(one(m) for m in meshes))
        return results.count(False)

    async def setup(self) -> None: ...

    def go(self) -> None:
        self.running = True
        self.mark()

    async def finish(self) -> dict[str, Any]:
        return {}

    async def drain(self, pending: Callable[[], int], timeout: float = 10.0) -> None:
        """Wait (bounded) until `pending()` is 0 after the senders stopped."""
        deadline = time.monotonic() + timeout
        while pending() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


@dataclass(slots=True)
class Pair:
    sender: Mesh
    receiver: Mesh
    in_flight: int = 0
    seq: int = 0


class RelayRole(Role):
    """Pairs of meshes; each sender keeps `window` relays in flight to its receiver."""

    async def setup(self) -> None:
        self.pairs: list[Pair] = []
        for sender_id, receiver_id in self.job["pairs"]:
            pair = Pair(Mesh(sender_id, self.stats), Mesh(receiver_id, self.stats))
            pair.receiver.on_incoming = lambda sent_ns, seq, pair=pair: self.delivered(pair, sent_ns)
            self.pairs.append(pair)
        self.meshes = [m for p in self.pairs for m in (p.sender, p.receiver)]
        if failed := await self.connect_all(self.meshes, concurrency=len(self.meshes)):
            raise RuntimeError(f"{failed} meshes failed to connect")

    def send_one(self, pair: Pair) -> None:
        pair.seq += 1
        pair.in_flight += 1
        pair.sender.send(RELAY % (pair.receiver.id.encode(), pair.seq, time.monotonic_ns(), pair.seq))

    def delivered(self, pair: Pair, sent_ns: int) -> None:
        pair.in_flight -= 1
        self.record(sent_ns)
        if self.running:
            self.send_one(pair)

    def go(self) -> None:
        super().go()
        for pair in self.pairs:
            for _ in range(self.job["window"]):
                self.send_one(pair)

    async def finish(self) -> dict[str, Any]:
        await self.drain(lambda: sum(p.in_flight for p in self.pairs))
        return {"lost": sum(p.in_flight for p in self.pairs), "sent": sum(p.seq for p in self.pairs)}


class FanoutRole(Role):
    """One broadcaster and its receivers in one process, so the window is exact.

    `rate` > 0: broadcasts at that fixed rate. `rate` == 0: keeps `window`
    broadcasts in flight, a broadcast leaving the window when every receiver got it.
    """

    async def setup(self) -> None:
        self.sender = Mesh(self.job["sender"], self.stats)
        self.receivers = [Mesh(m, self.stats) for m in self.job["receivers"]]
        for mesh in self.receivers:
            mesh.on_incoming = self.delivered
        self.pending: dict[int, int] = {}  # seq -> receivers still waiting
        self.seq = 0
        self.meshes = [self.sender, *self.receivers]
        if failed := await self.connect_all(self.meshes, concurrency=len(self.meshes)):
            raise RuntimeError(f"{failed} meshes failed to connect")

    def send_one(self) -> None:
        self.seq += 1
        self.pending[self.seq] = len(self.receivers)
        self.sender.send(BROADCAST % (self.seq, time.monotonic_ns(), self.seq))

    def delivered(self, sent_ns: int, seq: int) -> None:
        self.record(sent_ns)
        left = self.pending.get(seq, 0) - 1
        if left > 0:
            self.pending[seq] = left
            return
        self.pending.pop(seq, None)
        if self.running and not self.job["rate"] and len(self.pending) < self.job["window"]:
            self.send_one()

    def go(self) -> None:
        super().go()
        if self.job["rate"]:
            self.pacer = asyncio.get_running_loop().create_task(self.paced(self.job["rate"]))
        else:
            for _ in range(self.job["window"]):
                self.send_one()

    async def paced(self, rate: float) -> None:
        start = time.monotonic()
        while self.running:
            self.send_one()
            await asyncio.sleep(max(0.0, start + self.seq / rate - time.monotonic()))

    async def finish(self) -> dict[str, Any]:
        await self.drain(lambda: len(self.pending))
        return {"lost": sum(self.pending.values()), "sent": self.seq, "receivers": len(self.receivers)}


class ConnectRole(Role):
    """Connect and authenticate many meshes at `go` (all at once: an auth storm), then hold them."""

    async def setup(self) -> None:
        self.meshes = [Mesh(m, self.stats) for m in self.job["meshes"]]

    def go(self) -> None:
        super().go()
        self.task = asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        concurrency = self.job.get("concurrency") or len(self.meshes)
        deflate = bool(self.job.get("deflate", False))
        self.failed = await self.connect_all(self.meshes, concurrency=concurrency, deflate=deflate)
        self.done_t = time.monotonic()
        emit({"event": "done", "failed": self.failed})

    async def finish(self) -> dict[str, Any]:
        if not self.task.done():
            self.task.cancel()
            authed = sum(m.authed is not None and m.authed.done() and not m.authed.exception() for m in self.meshes)
            return {"failed": len(self.meshes) - authed, "unfinished": True}
        clients = [m.client for m in self.meshes if m.client is not None]
        return {
            "failed": self.failed,
            "done_t": self.done_t,
            "deflate_accepted": sum(c.deflate_accepted for c in clients),
        }


class WatcherRole(Role):
    """An already-connected mesh relaying to itself back to back: the max round trip is the worst stall."""

    async def setup(self) -> None:
        self.mesh = Mesh(self.job["mesh"], self.stats)
        self.waiter: asyncio.Future[None] | None = None
        self.mesh.on_incoming = self.echoed
        self.meshes = [self.mesh]
        if await self.connect_all(self.meshes, concurrency=1):
            raise RuntimeError("watcher failed to connect")

    def echoed(self, sent_ns: int, seq: int) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def go(self) -> None:
        super().go()
        self.task = asyncio.get_running_loop().create_task(self.ping_loop())

    async def ping_loop(self) -> None:
        loop = asyncio.get_running_loop()
        seq = 0
        while self.running:
            seq += 1
            self.waiter = loop.create_future()
            sent = time.monotonic_ns()
            self.mesh.send(RELAY % (self.mesh.id.encode(), seq, sent, seq))
            try:
                async with asyncio.timeout(30):
                    await self.waiter
            except TimeoutError:
                self.stats.error("watcher: no echo within 30 s")
                return
            self.record(sent)


class RegisterRole(Role):
    """POST /register for every mesh over `conns` keep-alive connections."""

    def go(self) -> None:
        super().go()
        self.task = asyncio.get_running_loop().create_task(self.register())

    async def register(self) -> None:
        meshes: list[str] = self.job["meshes"]
        conns = max(1, int(self.job.get("conns", 1)))

        async def client(ids: list[str]) -> None:
            http = HttpClient(self.host, self.port)
            try:
                for mesh_id in ids:
                    status, body = await http.request("POST", "/register", registration(mesh_id))
                    if status == 200:
                        self.count += 1
                    else:
                        self.stats.error(f"{mesh_id}: register {status} {body[:100]!r}")
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                self.stats.error(f"register connection failed: {exc!r}")
            finally:
                await http.aclose()

        await asyncio.gather(*(client(meshes[i::conns]) for i in range(conns)))
        self.done_t = time.monotonic()
        emit({"event": "done"})

    async def finish(self) -> dict[str, Any]:
        if not self.task.done():
            self.task.cancel()
            return {"ok": self.count, "unfinished": True}
        return {"ok": self.count, "done_t": self.done_t}


ROLES: dict[str, type[Role]] = {
    "relay": RelayRole,
    "fanout": FanoutRole,
    "connect": ConnectRole,
    "watcher": WatcherRole,
    "register": RegisterRole,
}

# --- Process ----------------------------------------------------------------------


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    job = json.loads(await reader.readline())
    loop.call_later(float(job.get("deadline_s", 300)), os._exit, 3)  # never outlive the harness
    if job.get("nice"):
        os.nice(int(job["nice"]))
    role = ROLES[job["role"]](job)
    await role.setup()
    emit({"event": "ready", "pid": os.getpid()})
    while (line := (await reader.readline()).decode().strip()) not in ("stop", ""):
        if line == "go":
            role.go()
        elif line == "mark":
            role.mark()
    role.running = role.measuring = False
    window_s, cpu_s = time.monotonic() - role.mark_t, _cpu() - role.mark_cpu
    result = await role.finish()
    result.update(
        event="result",
        count=role.count,
        window_s=window_s,
        cpu_s=cpu_s,
        mark_t=role.mark_t,
        samples=role.samples,
        errors=role.stats.errors,
        error_count=role.stats.error_count,
        closes=role.stats.closes,
        reconnects=role.stats.reconnects,
    )
    emit(result)
    for mesh in role.meshes:
        mesh.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="loadgen %(levelname)s %(message)s")
    uvloop.run(main())
