"""Load generator worker: one process, one role, driven by run.py over pipes.

stdin:  line 1 is the job (JSON); then control lines `go`, `mark`, `stop`,
        and any other line is a command for the role (`catchup`).
stdout: JSON event lines: `ready` after setup, `done` when a finite role has
        finished its work, `result` after `stop` (then the process exits);
        a role may add its own (`caught_up`).

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
import re
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import uvloop
from wsclient import OP_TEXT, HttpClient, UpgradeRefused, WsClient, mask, ws_connect

log = logging.getLogger("loadgen")
MAX_SAMPLES = 400_000
MAX_ERRORS = 20

# --- Frames -----------------------------------------------------------------

FILLER = b"lorem ipsum dolor sit amet "


def message(filler: int = 3 * len(FILLER)) -> bytes:
    """A realistic chat payload (~300 B by default); `content` carries the send time and a sequence number."""
    text = (FILLER * (filler // len(FILLER) + 1))[:filler]
    return (
        b'{"type":"new_message","message":{"id":"msg-%010d","roomId":"room-4f1c2a9e","roomName":"general",'
        b'"senderId":"user-8d2e61","senderName":"Alice Example","content":"t=%020d;s=%010d;'
        + text.replace(b"%", b"%%")
        + b'","isDm":false,"createdAt":"2025-06-01T12:00:00.000Z"}}'
    )


_MESSAGE = message()
RELAY = b'{"type":"gateway_relay","targetMeshId":"%s","payload":' + _MESSAGE + b"}"
BROADCAST = b'{"type":"gateway_broadcast","payload":' + _MESSAGE + b"}"


def relay_with_id(filler: int) -> bytes:
    """A relay template carrying an `id` (so the gateway answers with `gateway_ack`): id, target, then the stamps."""
    return b'{"type":"gateway_relay","id":"%s","targetMeshId":"%s","payload":' + message(filler) + b"}"


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
    id: str = ""  # gateway_ack, and an error answering a frame that had one
    delivered: int = 0  # gateway_ack
    queued: int = 0  # gateway_ack: away meshes the frame was kept for
    count: int = 0  # error messages_dropped


decode_inbound = msgspec.json.Decoder(Inbound).decode


def parse_content(content: str) -> tuple[int, int]:
    """(send time ns, sequence) from `t=<20 digits>;s=<10 digits>;...`."""
    return int(content[2:22]), int(content[25:35])


# Fast path: all three servers (the gateway, the ceiling, the reference Node gateway: JSON.stringify, no
# spaces) put `type` first and write `"content":"t=` as is, so a delivery is recognised, and its
# stamp read, without decoding the JSON (the receivers' hottest line).
INCOMING = b'{"type":"gateway_incoming"'
STAMP = b'"content":"t='
# gateway_participants: a storm of 2,000 meshes with participants sends ~4 million groups, ~900 MB, to
# one core that stands in for 2,000 nodes. Decoding them would cost more than the server's sending them;
# even picking each group's mesh id out with one C-level regex scan a frame costs 1.4 s of CPU a GB (the
# findall and the set), and spent while the storm ran it set the storm's pace: 2.39-3.04x the storm
# without participants, against 1.66-2.05x with every 8th mesh doing it (same gateway, alternating,
# 2026-12-07; bench/README.md). Counting GROUP_START costs 0.3 s a GB. So every VERIFY_EVERY-th mesh of a worker tells
# its groups apart by mesh id (every other mesh's group, each at least once); the others count theirs.
PARTICIPANTS = b'{"type":"gateway_participants"'
GROUP_MESH_ID = re.compile(rb'"meshId":"([^"]*)","meshName":"[^"]*","participants":\[\{')  # non-empty groups only
GROUP_START = b'"participants":[{'  # once per non-empty group, as GROUP_MESH_ID matches
VERIFY_EVERY = 8


def participants_of(mesh_id: str, n: int) -> list[dict[str, str]]:
    """What a node announces in its gateway_auth: `n` participants, shaped like a node's."""
    return [{"id": f"u{k}@{mesh_id}", "name": f"Member {k}", "type": "human"} for k in range(n)]


def fake_ip(i: int) -> str:
    """The i-th (1-based) made-up client address, 10.a.b.c: header text only, nothing is sent there."""
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


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
        self.auth_ok_t = 0.0  # monotonic time the last gateway_auth_ok was parsed
        self.on_incoming: Callable[[int, int], None] | None = None  # (send time ns, sequence)
        self.on_answer: Callable[[Inbound], None] | None = None  # gateway_ack, or an error with an `id`
        self.on_participants: Callable[[bytes], None] | None = None  # a gateway_participants frame, undecoded
        self.participants: list[dict[str, str]] = []  # sent in its gateway_auth

    async def connect(self, host: str, port: int, *, deflate: bool, timeout: float) -> None:
        self.authed = asyncio.get_running_loop().create_future()
        self.auth_ok_t = 0.0
        client = self.client = await ws_connect(
            host, port, on_message=self.on_message, offer_deflate=deflate, timeout=timeout
        )
        client.closed.add_done_callback(lambda _: self._closed(client))
        auth: dict[str, Any] = {"type": "gateway_auth", "meshId": self.id, "secret": secret_for(self.id)}
        if self.participants:
            auth["participants"] = self.participants
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
        if self.on_participants is not None and data.startswith(PARTICIPANTS):
            self.on_participants(data)
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
            self.auth_ok_t = time.monotonic()
            if self.authed is not None and not self.authed.done():
                self.authed.set_result(None)
        elif frame.type == "gateway_ack":
            if self.on_answer is not None:
                self.on_answer(frame)
        elif frame.type in ("gateway_auth_error", "error"):
            extra = f" (count {frame.count})" if frame.count else ""
            self.stats.error(f"{self.id}: {frame.type} {frame.code} {frame.message}{extra}")
            if frame.type == "gateway_auth_error" and self.authed is not None and not self.authed.done():
                self.authed.set_exception(ConnectionError(frame.message))
            if frame.id and self.on_answer is not None:  # answered, if not as hoped: the window moves on
                self.on_answer(frame)

    def _closed(self, client: WsClient) -> None:
        if client.left:  # we closed it on purpose
            return
        code = str(client.close_code)
        self.stats.closes[code] = self.stats.closes.get(code, 0) + 1
        if client is self.client and self.authed is not None and not self.authed.done():  # fail now, not later
            self.authed.set_exception(ConnectionError(f"closed ({code}) before auth"))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    async def leave(self, timeout: float = 10.0) -> None:
        """Close on purpose (not counted as a close) and wait until the socket is gone."""
        if self.client is None:
            return
        client, self.client = self.client, None
        client.left = True
        client.close()
        async with asyncio.timeout(timeout):
            await client.closed


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

    async def leave_all(self, mesh_ids: list[str]) -> None:
        """Make meshes *away*: each connects and authenticates once, then leaves."""
        if not mesh_ids:
            return
        meshes = [Mesh(m, self.stats) for m in mesh_ids]
        if failed := await self.connect_all(meshes, concurrency=len(meshes)):
            raise RuntimeError(f"{failed} meshes to make away failed to connect")
        await asyncio.gather(*(m.leave() for m in meshes))

    async def setup(self) -> None: ...

    def go(self) -> None:
        self.running = True
        self.mark()

    def command(self, line: str) -> None:
        self.stats.error(f"unknown command {line!r}")

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
        await self.leave_all(self.job.get("away", []))  # receivers that are away during the measurement
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


@dataclass(slots=True)
class Sender:
    mesh: Mesh
    targets: list[Mesh]
    left: int  # relays still to send
    in_flight: int = 0
    sent: int = 0


class KeepRole(Role):
    """Relays to away meshes, each answered by `gateway_ack` once kept; then, on `catchup`, one of them
    comes back and counts what it is sent.

    Job: `away` (target mesh ids, made away in setup), `senders` (mesh ids; target i belongs to sender
    i mod len(senders), so each target's frames come from one socket, in order), `per_target` relays each,
    `window` unanswered relays per sender, `frame_bytes` per relay frame (default: the ~300 B payload).
    Relay n (1-based) to a target carries sequence n, so the catch-up can check order and exactly-once."""

    async def setup(self) -> None:
        # Payload text sized so that each relay frame is about `frame_bytes` on the wire.
        base = len(relay_with_id(0) % (b"k1", self.job["away"][0].encode(), 0, 0, 0))
        self.template = relay_with_id(max(0, int(self.job.get("frame_bytes", 0)) - base) or 3 * len(FILLER))
        self.per_target = int(self.job["per_target"])
        self.window = int(self.job["window"])
        self.targets = [Mesh(m, self.stats) for m in self.job["away"]]
        self.seqs = {m.id: 0 for m in self.targets}
        self.senders = [
            Sender(Mesh(m, self.stats), self.targets[i :: len(self.job["senders"])], 0)
            for i, m in enumerate(self.job["senders"])
        ]
        for sender in self.senders:
            sender.left = len(sender.targets) * self.per_target
            sender.mesh.on_answer = lambda frame, sender=sender: self.answered(sender, frame)
        if failed := await self.connect_all(self.targets, concurrency=len(self.targets)):
            raise RuntimeError(f"{failed} meshes to make away failed to connect")
        self.meshes = [s.mesh for s in self.senders]
        if failed := await self.connect_all(self.meshes, concurrency=len(self.meshes)):
            raise RuntimeError(f"{failed} senders failed to connect")
        await asyncio.gather(*(m.leave() for m in self.targets))
        self.kept = self.answers = self.acks_not_kept = 0
        self.keep_done_t = 0.0

    def go(self) -> None:
        super().go()
        self.keep_t = time.monotonic()
        for sender in self.senders:
            self.fill(sender)

    def fill(self, sender: Sender) -> None:
        while sender.left and sender.in_flight < self.window:
            target = sender.targets[sender.sent % len(sender.targets)]
            self.seqs[target.id] += 1
            sender.sent += 1
            sender.left -= 1
            sender.in_flight += 1
            seq, frame_id = self.seqs[target.id], f"k{sender.sent}".encode()
            sender.mesh.send(self.template % (frame_id, target.id.encode(), seq, time.monotonic_ns(), seq))

    def answered(self, sender: Sender, frame: Inbound) -> None:
        sender.in_flight -= 1
        self.answers += 1
        if frame.type == "gateway_ack":
            if frame.queued == 1 and frame.delivered == 0:
                self.kept += 1
            else:
                self.acks_not_kept += 1
                self.stats.error(f"relay {frame.id} to an away mesh acked delivered={frame.delivered} "
                                 f"queued={frame.queued}, expected 0 and 1")  # fmt: skip
        self.fill(sender)
        if self.answers == self.per_target * len(self.targets):
            self.keep_done_t = time.monotonic()
            emit({"event": "done", "kept": self.kept, "keep_s": self.keep_done_t - self.keep_t})

    # --- catch-up ---

    def command(self, line: str) -> None:
        if line == "catchup":
            self.catchup_task = asyncio.get_running_loop().create_task(self.catchup())
        elif line == "again":
            self.again_task = asyncio.get_running_loop().create_task(self.again())
        else:
            super().command(line)

    async def catchup(self) -> None:
        """The first `returning` targets (default 1) authenticate again, all at once, and receive their
        mailboxes: every frame once, in order. Times run from each one's gateway_auth_ok."""
        returning = self.targets[: int(self.job.get("returning", 1))]
        tracks = [Track(mesh, self.per_target, asyncio.get_running_loop().create_future()) for mesh in returning]
        for track in tracks:
            track.mesh.on_incoming = lambda sent_ns, seq, track=track: track.caught(seq)
        t0 = time.monotonic()
        try:
            if failed := await self.connect_all(returning, concurrency=len(returning)):
                raise ConnectionError(f"{failed} returning meshes failed to connect")
            async with asyncio.timeout(float(self.job.get("catchup_timeout_s", 60))):
                await asyncio.gather(*(track.complete for track in tracks))
        except (OSError, ConnectionError, TimeoutError) as exc:
            self.stats.error(f"catch-up: {exc!r} after {sum(t.received for t in tracks)} frames")
        auth_ok = min((t.mesh.auth_ok_t for t in tracks if t.mesh.auth_ok_t), default=t0)
        last = max((t.last_t for t in tracks), default=0.0) if all(t.last_t for t in tracks) else 0.0
        emit({
            "event": "caught_up", "connect_s": auth_ok - t0, "catchup_s": last - auth_ok if last else 0.0,
            "first_s": max((t.first_t - t.mesh.auth_ok_t for t in tracks if t.first_t), default=0.0),
            "slowest_s": max((t.last_t - t.mesh.auth_ok_t for t in tracks if t.last_t), default=0.0),
        })  # fmt: skip
        await asyncio.sleep(float(self.job.get("grace_s", 0.5)))  # anything sent twice comes now
        self.returned, self.tracks = [t.mesh for t in tracks], tracks
        emit({
            "event": "checked", **{k: sum(getattr(t, k) for t in tracks) for k in Track.COUNTS},
            "in_order": sum(t.expected - 1 for t in tracks), "complete": sum(bool(t.last_t) for t in tracks),
        })  # fmt: skip

    async def again(self) -> None:
        """Confirmed frames are never sent again: once each returning mesh has answered a ping sent after
        its last frame (that pong confirms them all), it leaves and authenticates once more, and must
        receive nothing."""
        t0 = time.monotonic()
        deadline = t0 + float(self.job.get("confirm_timeout_s", 10))
        self.pings = sum(m.client.pings for m in self.returned if m.client)

        def unconfirmed() -> list[Track]:
            return [t for t in self.tracks if t.mesh.client is None or t.mesh.client.ping_t <= t.last_t]

        while unconfirmed() and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        if late := unconfirmed():
            self.stats.error(f"{len(late)} meshes got no ping after their last kept frame")
        confirm_wait_s = time.monotonic() - t0
        await asyncio.gather(*(m.leave() for m in self.returned))
        resent: list[int] = []
        for mesh in self.returned:
            mesh.on_incoming = lambda sent_ns, seq: resent.append(seq)
        if failed := await self.connect_all(self.returned, concurrency=len(self.returned)):
            self.stats.error(f"again: {failed} meshes failed to connect")
        await asyncio.sleep(float(self.job.get("grace_s", 0.5)))
        emit({"event": "again", "resent": len(resent), "confirm_wait_s": confirm_wait_s, "first": resent[:5]})

    async def finish(self) -> dict[str, Any]:
        unanswered = sum(s.in_flight + s.left for s in self.senders)
        pings = getattr(self, "pings", 0)  # answered by the returning meshes during the catch-up
        return {"kept": self.kept, "lost": unanswered, "unfinished": not self.keep_done_t,
                "sent": sum(s.sent for s in self.senders), "pings": pings}  # fmt: skip


@dataclass(slots=True)
class Track:
    """What one returning mesh received: sequence n is the n-th frame kept for it."""

    COUNTS = ("received", "duplicates", "gaps", "before_auth")
    mesh: Mesh
    total: int
    complete: asyncio.Future[None]
    received: int = 0
    duplicates: int = 0
    gaps: int = 0  # frames missing before one received (or a reordering)
    before_auth: int = 0
    expected: int = 1
    first_t: float = 0.0
    last_t: float = 0.0

    def caught(self, seq: int) -> None:
        now = time.monotonic()
        self.received += 1
        if not self.mesh.auth_ok_t:
            self.before_auth += 1
        if seq == self.expected:
            self.expected += 1
        elif seq < self.expected:
            self.duplicates += 1
        else:
            self.gaps += 1
            self.expected = seq + 1
        self.first_t = self.first_t or now
        if self.expected - 1 == self.total and not self.last_t:
            self.last_t = now
            if not self.complete.done():
                self.complete.set_result(None)


class ConnectRole(Role):
    """Connect and authenticate many meshes at `go` (all at once: an auth storm), then hold them.

    `participants` > 0: each mesh brings that many in its gateway_auth and follows the participant
    groups it is sent (greeting and announcements): every VERIFY_EVERY-th mesh the distinct groups by
    mesh id, the others how many groups (repeats included). Once every mesh of this worker has had
    `expect_groups` it emits `groups` (the time the last one completed)."""

    async def setup(self) -> None:
        self.meshes = [Mesh(m, self.stats) for m in self.job["meshes"]]
        self.expect_groups = int(self.job.get("expect_groups", 0))
        self.seen: dict[str, set[bytes]] = {}  # the verifying meshes' distinct groups (until complete)
        self.counted: dict[str, int] = {}  # the other meshes' groups (until complete)
        self.complete_t: list[float] = []
        self.verified = 0  # verifying meshes that got every other mesh's group
        self.group_frames = self.group_count = self.group_bytes = 0
        if n := int(self.job.get("participants", 0)):
            for i, mesh in enumerate(self.meshes):
                mesh.participants = participants_of(mesh.id, n)
                if i % VERIFY_EVERY == 0:
                    self.seen[mesh.id] = set()
                else:
                    self.counted[mesh.id] = 0
                mesh.on_participants = lambda data, mesh=mesh: self.groups(mesh, data)

    def groups(self, mesh: Mesh, data: bytes) -> None:
        count = data.count(GROUP_START)
        self.group_frames += 1
        self.group_count += count
        self.group_bytes += len(data)
        if (seen := self.seen.get(mesh.id)) is not None:
            seen.update(GROUP_MESH_ID.findall(data))
            if len(seen) < self.expect_groups:
                return
            del self.seen[mesh.id]  # complete: its set is not needed any more
            self.verified += 1
        elif (counted := self.counted.get(mesh.id)) is not None:
            self.counted[mesh.id] = counted = counted + count
            if counted < self.expect_groups:
                return
            del self.counted[mesh.id]
        else:  # already complete (a group sent again, or an update)
            return
        self.complete_t.append(time.monotonic())
        if not self.seen and not self.counted:
            emit({"event": "groups", "t": self.complete_t[-1]})

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
        groups = {
            "group_frames": self.group_frames, "groups": self.group_count, "group_bytes": self.group_bytes,
            "groups_complete": len(self.complete_t), "groups_done_t": max(self.complete_t, default=0.0),
            "groups_verified": self.verified, "groups_verifying": len(self.meshes[::VERIFY_EVERY]),
            "groups_short": sorted([*map(len, self.seen.values()), *self.counted.values()])[:5],  # least complete
        }  # fmt: skip
        if not self.task.done():
            self.task.cancel()
            authed = sum(m.authed is not None and m.authed.done() and not m.authed.exception() for m in self.meshes)
            return {"failed": len(self.meshes) - authed, "unfinished": True, **groups}
        clients = [m.client for m in self.meshes if m.client is not None]
        return {
            "failed": self.failed,
            "done_t": self.done_t,
            "deflate_accepted": sum(c.deflate_accepted for c in clients),
            **groups,
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
        """Relay to itself and await the echo, back to back (or one every `interval_s`); an echo that takes
        longer than `echo_timeout_s` (default 30) is an error."""
        loop = asyncio.get_running_loop()
        interval = float(self.job.get("interval_s", 0))
        echo_timeout = float(self.job.get("echo_timeout_s", 30))
        seq, start = 0, time.monotonic()
        while self.running:
            seq += 1
            self.waiter = loop.create_future()
            sent = time.monotonic_ns()
            self.mesh.send(RELAY % (self.mesh.id.encode(), seq, sent, seq))
            try:
                async with asyncio.timeout(echo_timeout):
                    await self.waiter
            except TimeoutError:
                self.stats.error(f"watcher: no echo within {echo_timeout:.0f} s")
                return
            self.record(sent)
            if interval:
                await asyncio.sleep(max(0.0, start + seq * interval - time.monotonic()))


class LegitRole(WatcherRole):
    """A mesh that connects during an attack: at `go` it connects and authenticates (timed), then relays
    to itself like the watcher (one every `interval_s`); on `connect` a second mesh (`second`) connects
    and authenticates, timed too. Its connect times are `connect_ms`."""

    async def setup(self) -> None:
        self.mesh = Mesh(self.job["mesh"], self.stats)
        self.waiter = None
        self.mesh.on_incoming = self.echoed
        self.meshes = [self.mesh]
        self.connect_ms: list[float] = []

    async def timed_connect(self, mesh: Mesh) -> bool:
        t0 = time.monotonic()
        if await self.connect_all([mesh], concurrency=1):
            return False
        self.connect_ms.append((time.monotonic() - t0) * 1000)
        return True

    def go(self) -> None:
        Role.go(self)
        self.task = asyncio.get_running_loop().create_task(self.start())

    async def start(self) -> None:
        ok = await self.timed_connect(self.mesh)
        emit({"event": "connected", "ok": ok})
        if ok:
            await self.ping_loop()

    def command(self, line: str) -> None:
        if line != "connect":
            return super().command(line)
        second = Mesh(self.job["second"], self.stats)
        self.meshes.append(second)

        async def connect() -> None:
            emit({"event": "connected", "ok": await self.timed_connect(second)})

        self.second_task = asyncio.get_running_loop().create_task(connect())

    async def finish(self) -> dict[str, Any]:
        return {"connect_ms": self.connect_ms}


class ProbeRole(Role):
    """Legit meshes authenticating, one starting every `interval_s` whatever the others do (open loop:
    a slow answer does not delay the next probe, so it cannot hide a stall): each sample is connect +
    upgrade + gateway_auth until gateway_auth_ok; the mesh then leaves. `starts` are the probes' start
    times (monotonic), in order, with `samples` (ns) in the same order; a failed probe has no sample.
    `phases` splits each sample (seconds, same order): until the TCP connection is made, until the
    101 (the server accepting the connection and answering the upgrade), and from the 101 to
    gateway_auth_ok."""

    async def setup(self) -> None:
        self.meshes = [Mesh(m, self.stats) for m in self.job["meshes"]]
        self.starts: list[float] = []
        self.phases: list[tuple[float, float, float]] = []
        self.failed = 0

    def go(self) -> None:
        super().go()
        self.task = asyncio.get_running_loop().create_task(self.probe())

    async def probe(self) -> None:
        interval = float(self.job.get("interval_s", 0))
        start = time.monotonic()
        tasks = []
        for i, mesh in enumerate(self.meshes):
            await asyncio.sleep(max(0.0, start + i * interval - time.monotonic()))
            tasks.append(asyncio.get_running_loop().create_task(self.one(mesh)))
        await asyncio.gather(*tasks)
        # in start order (samples stop at MAX_SAMPLES)
        rows = sorted(zip(self.starts, self.samples, self.phases, strict=False))
        self.starts, self.samples, self.phases = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        self.done_t = time.monotonic()
        emit({"event": "done"})

    async def one(self, mesh: Mesh) -> None:
        timeout = float(self.job.get("connect_timeout_s", 30))
        t0, sent = time.monotonic(), time.monotonic_ns()
        try:
            await mesh.connect(self.host, self.port, deflate=False, timeout=timeout)
        except (OSError, ConnectionError, TimeoutError) as exc:  # 503, reset, auth error: all failures here
            self.failed += 1
            self.stats.error(f"{mesh.id}: legit connect/auth failed: {exc!r}")
        else:
            self.record(sent)
            self.starts.append(t0)
            client, authed_t = mesh.client, time.monotonic()
            assert client is not None
            tcp, upgraded = client.connected_t, client.upgraded_t
            self.phases.append((tcp - t0, upgraded - tcp, authed_t - upgraded))
        try:
            await mesh.leave()
        except TimeoutError:
            self.stats.error(f"{mesh.id}: not closed within 10 s")

    async def finish(self) -> dict[str, Any]:
        if not self.task.done():
            self.task.cancel()
            return {"failed": len(self.meshes) - self.count, "unfinished": True}
        return {"failed": self.failed, "done_t": self.done_t, "starts": self.starts, "phases": self.phases}


class GuessRole(Role):
    """A flood of wrong-secret gateway_auth attempts, each on a new connection whose upgrade carries
    `X-Forwarded-For: 10.a.b.c` (the harness connects from 127.0.0.1, which the gateway trusts for that
    header by default, so each attempt comes "from" that address; nothing is sent to it).

    Attempt i guesses for `targets[i % len(targets)]` (no `targets`: for a meshId of its own, never
    registered, `nobody-<i>`) from the ((i % ips) + 1)-th address, `rate` a second (0: as fast as
    `concurrency` attempts in flight allow), until `stop` or `max_attempts`.
    Outcomes, from what the gateway answers: `checked` ("Invalid credentials": the secret was
    checked), `throttled` ("Too many attempts", with `retryAfterMs`: it was not), `refused` (the
    upgrade was refused, e.g. 503), `unanswered` (reset or timed out before an answer)."""

    OUTCOMES = ("checked", "throttled", "refused", "unanswered", "other")

    async def setup(self) -> None:
        self.targets: list[str] = self.job["targets"]
        self.ips = max(1, int(self.job.get("ips", 1)))
        self.outcomes = dict.fromkeys(self.OUTCOMES, 0)
        self.statuses: dict[str, int] = {}
        self.attempts = 0
        self.first_throttled_s = 0.0  # when the first "Too many attempts" came, from `go`
        self.timeline: dict[int, list[int]] = {}  # 100 ms bucket since `go` -> [checked, throttled]

    def go(self) -> None:
        super().go()
        self.task = asyncio.get_running_loop().create_task(self.flood())

    async def flood(self) -> None:
        rate, limit = float(self.job.get("rate", 0)), int(self.job.get("max_attempts", 1_000_000))
        gate = asyncio.Semaphore(int(self.job.get("concurrency", 64)))
        tasks: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            gate.release()

        start = time.monotonic()
        while self.running and self.attempts < limit:
            await gate.acquire()
            if not self.running:
                gate.release()
                break
            self.attempts += 1
            task = asyncio.get_running_loop().create_task(self.attempt(self.attempts))
            tasks.add(task)
            task.add_done_callback(finished)
            if rate:
                await asyncio.sleep(max(0.0, start + self.attempts / rate - time.monotonic()))
        if tasks:
            await asyncio.wait(tasks, timeout=15)

    async def attempt(self, i: int) -> None:
        target = self.targets[i % len(self.targets)] if self.targets else f"nobody-{i:07d}"
        ip = fake_ip(i % self.ips + 1)
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def on_message(data: bytes) -> None:
            if not answer.done():
                answer.set_result(data)

        client: WsClient | None = None
        outcome = "other"
        try:
            async with asyncio.timeout(15):
                client = await ws_connect(
                    self.host, self.port, on_message=on_message, headers=[("X-Forwarded-For", ip)], timeout=15
                )
                guess = {"type": "gateway_auth", "meshId": target, "secret": f"wrong-guess-{i:08d}"}
                client.send(json.dumps(guess).encode())
                data = await answer
            if b"Invalid credentials" in data:
                outcome = "checked"
                self.timeline.setdefault(int((time.monotonic() - self.mark_t) * 10), [0, 0])[0] += 1
            elif b"Too many attempts" in data:
                outcome = "throttled"
                self.first_throttled_s = self.first_throttled_s or time.monotonic() - self.mark_t
                self.timeline.setdefault(int((time.monotonic() - self.mark_t) * 10), [0, 0])[1] += 1
            else:
                self.stats.error(f"guess for {target}: unexpected answer {data[:120]!r}")
        except UpgradeRefused as exc:
            outcome = "refused"
            self.statuses[str(exc.status)] = self.statuses.get(str(exc.status), 0) + 1
        except (OSError, ConnectionError, TimeoutError):
            outcome = "unanswered"
        finally:
            if client is not None and client.transport is not None:
                client.transport.abort()  # the gateway closes it anyway; a flood does not wait for that
        if self.measuring:
            self.outcomes[outcome] += 1

    async def finish(self) -> dict[str, Any]:
        if not self.task.done():
            self.task.cancel()
        timeline = [self.timeline.get(i, [0, 0]) for i in range(max(self.timeline, default=-1) + 1)]
        return {"attempts": self.attempts, "first_throttled_s": self.first_throttled_s,
                "refused_status": self.statuses, "timeline": timeline, **self.outcomes}  # fmt: skip


def client_frame(fin: bool, opcode: int, payload: bytes, *, length: int | None = None) -> tuple[bytes, bytes]:
    """(frame, mask key): a masked client frame header announcing `length` bytes (default: the
    payload's), then the payload, masked from offset 0 (a payload of a multiple of 4 bytes leaves
    the mask in phase for the frame's next bytes)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        header = struct.pack("!BB", b0, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", b0, 0xFE, n)
    else:
        header = struct.pack("!BBQ", b0, 0xFF, n)
    key = os.urandom(4)
    return header + key + mask(payload, key), key


class PreauthRole(Role):
    """Sockets that never authenticate and try to make the gateway buffer.

    At `go`: `frames` + `fragments` WebSockets upgrade (`concurrency` at a time) and wait, sending
    nothing (`holding` once all are open). On `fire`: each of the `frames` sockets starts one text frame
    announcing `announce` bytes and sends `chunk` bytes of it every `interval_s`, never finishing;
    each of the `fragments` sockets sends a text message in non-final fragments of `chunk` bytes,
    one every `interval_s` (a message that keeps growing, each fragment small); and `headers`
    HTTP connections send a `GET /gateway` upgrade whose headers never end, `header_chunk` bytes
    every `header_interval_s`, up to `header_total` bytes. Each stops when the gateway closes it
    (or answers), at `stop`, or at the end of what it meant to send."""

    async def setup(self) -> None:
        self.frame_clients: list[WsClient] = []
        self.fragment_clients: list[WsClient] = []
        self.opened = {"frames": 0, "fragments": 0}
        self.refused: dict[str, int] = {}
        self.open_failed = 0
        # per kind: close codes / HTTP statuses, bytes sent before the gateway's answer, ms until it
        self.answers: dict[str, dict[str, int]] = {"frames": {}, "fragments": {}, "headers": {}}
        self.sent_before: dict[str, list[int]] = {"frames": [], "fragments": [], "headers": []}
        self.answer_ms: dict[str, list[float]] = {"frames": [], "fragments": [], "headers": []}
        self.tasks: list[asyncio.Task[None]] = []

    def go(self) -> None:
        super().go()
        self.task = asyncio.get_running_loop().create_task(self.open_all())

    async def open_all(self) -> None:
        gate = asyncio.Semaphore(int(self.job.get("concurrency", 100)))

        async def one(kind: str, into: list[WsClient]) -> None:
            async with gate:
                try:
                    client = await ws_connect(self.host, self.port, timeout=30)
                except UpgradeRefused as exc:
                    self.refused[str(exc.status)] = self.refused.get(str(exc.status), 0) + 1
                    return
                except (OSError, ConnectionError, TimeoutError):
                    self.open_failed += 1
                    return
                self.opened[kind] += 1
                into.append(client)

        await asyncio.gather(
            *(one("frames", self.frame_clients) for _ in range(int(self.job.get("frames", 0)))),
            *(one("fragments", self.fragment_clients) for _ in range(int(self.job.get("fragments", 0)))),
        )
        emit({"event": "holding", **self.opened, "refused": self.refused, "open_failed": self.open_failed})

    def command(self, line: str) -> None:
        if line != "fire":
            return super().command(line)
        loop = asyncio.get_running_loop()
        self.fire_t = time.monotonic()
        self.tasks += [loop.create_task(self.big_frame(c)) for c in self.frame_clients]
        self.tasks += [loop.create_task(self.fragmented(c)) for c in self.fragment_clients]
        self.tasks += [loop.create_task(self.headers()) for _ in range(int(self.job.get("headers", 0)))]

    def answered(self, kind: str, what: str, sent: int, t0: float) -> None:
        self.answers[kind][what] = self.answers[kind].get(what, 0) + 1
        self.sent_before[kind].append(sent)
        self.answer_ms[kind].append((time.monotonic() - t0) * 1000)

    async def slow(self, kind: str, client: WsClient, first: bytes, more: Callable[[], bytes], total: int) -> None:
        """Write `first`, then `more()` every `interval_s` while the socket is open, up to `total` bytes."""
        interval = float(self.job.get("interval_s", 0.1))
        t0, sent = time.monotonic(), 0
        transport = client.transport
        assert transport is not None
        transport.write(first)
        sent += len(first)
        while self.running and not client.closed.done() and sent < total:
            try:
                await asyncio.wait_for(asyncio.shield(client.closed), interval)
            except TimeoutError:
                if transport.is_closing() or transport.get_write_buffer_size() > 1 << 20:
                    continue
                data = more()
                transport.write(data)
                sent += len(data)
        if client.closed.done():
            self.answered(kind, str(client.close_code), sent, t0)
        else:
            self.answered(kind, "open", sent, t0)  # the gateway never closed it
            transport.abort()

    async def big_frame(self, client: WsClient) -> None:
        chunk, announce = int(self.job.get("chunk", 1024)) // 4 * 4, int(self.job.get("announce", 1 << 20))
        first, key = client_frame(True, OP_TEXT, b"x" * chunk, length=announce)
        rest = mask(b"x" * chunk, key)  # the frame's next bytes (chunk is a multiple of 4: same mask phase)
        await self.slow("frames", client, first, lambda: rest, announce - chunk)

    async def fragmented(self, client: WsClient) -> None:
        chunk, limit = int(self.job.get("chunk", 1024)), int(self.job.get("announce", 1 << 20))
        first, _ = client_frame(False, OP_TEXT, b"y" * chunk)
        await self.slow("fragments", client, first, lambda: client_frame(False, 0, b"y" * chunk)[0], limit)

    async def headers(self) -> None:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes] = loop.create_future()

        class Listener(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                if not answer.done():
                    answer.set_result(data)

            def connection_lost(self, exc: Exception | None) -> None:
                if not answer.done():  # no answer: reset (RST) or closed (FIN) without a status line
                    answer.set_result(b"reset" if isinstance(exc, ConnectionResetError) else b"")

        chunk, total = int(self.job.get("header_chunk", 8192)), int(self.job.get("header_total", 4_000_000))
        interval = float(self.job.get("header_interval_s", 0.005))
        t0, sent = time.monotonic(), 0
        try:
            transport, _ = await loop.create_connection(Listener, self.host, self.port)
        except OSError:
            self.answered("headers", "connect failed", 0, t0)
            return
        head = (f"GET /gateway HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n")  # fmt: skip
        line = b"X-Filler: " + b"z" * max(1, chunk - 12) + b"\r\n"
        transport.write(head.encode())
        sent += len(head)
        while self.running and not answer.done() and sent < total:
            try:
                await asyncio.wait_for(asyncio.shield(answer), interval)
            except TimeoutError:
                if not transport.is_closing() and transport.get_write_buffer_size() <= 1 << 20:
                    transport.write(line)
                    sent += len(line)
        if not answer.done():  # sent everything (or stopped) without an answer: hold until `stop`
            while self.running and not answer.done():
                await asyncio.sleep(0.05)
        if answer.done():
            data = answer.result()
            status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else data.decode() or "closed"
            self.answered("headers", status, sent, t0)
        else:
            self.answered("headers", "open", sent, t0)
        transport.abort()

    async def finish(self) -> dict[str, Any]:
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)
        for client in self.frame_clients + self.fragment_clients:
            if client.transport is not None:
                client.transport.abort()
        return {
            "opened": self.opened, "refused_status": self.refused, "open_failed": self.open_failed,
            "answers": self.answers,
            "sent_before_max": {k: max(v, default=0) for k, v in self.sent_before.items()},
            "answer_ms_max": {k: max(v, default=0.0) for k, v in self.answer_ms.items()},
            "answer_ms_p50": {k: sorted(v)[len(v) // 2] if v else 0.0 for k, v in self.answer_ms.items()},
        }  # fmt: skip


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
    "legit": LegitRole,
    "probe": ProbeRole,
    "guess": GuessRole,
    "preauth": PreauthRole,
    "register": RegisterRole,
    "keep": KeepRole,
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
        else:
            role.command(line)
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
