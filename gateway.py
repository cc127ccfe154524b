"""Mesh Gateway: a federation relay between self-hosted mesh chat nodes.

Nodes register (meshId + secret) over HTTP, connect to /gateway over
WebSocket, authenticate, discover each other and relay JSON frames.
The wire protocol is fixed by existing nodes: see PROTOCOL.md.

Run it:   python gateway.py           (settings come from the environment)
Embed it: gateway = Gateway(settings); mount gateway.routes; enter gateway.lifespan.

The file reads top to bottom, one layer per section:
Settings -> Protocol -> Registry -> Hub -> Dispatcher -> Endpoints -> Assembly.
"""

from __future__ import annotations

import asyncio
import atexit
import bisect
import collections
import contextlib
import functools
import gc
import hashlib
import hmac
import itertools
import logging
import logging.handlers
import math
import multiprocessing
import os
import pickle
import queue
import re
import socket
import sqlite3
import struct
import sys
import threading
import time
import typing
import unicodedata
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Annotated, Any, Generic, Literal, Protocol, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Message, Receive, Send

log = logging.getLogger("mesh_gateway")
# uvicorn's and websockets' lines about each socket ("[accepted]", "connection open", "connection
# closed"), warnings and errors only: the gateway logs its own, with the mesh. Three records a
# socket were 7 % of the event loop in a flood of guesses (py-spy), even those filtered out.
SOCKET_LOG = logging.getLogger("mesh_gateway.socket")
SOCKET_LOG.setLevel(logging.WARNING)


# --- Settings ---------------------------------------------------------------

PositiveInt = Annotated[int, Meta(gt=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]


class SettingsError(Exception):
    """A bad environment value: one line naming the variable and the value."""


class Settings(Struct, frozen=True, kw_only=True, rename="upper"):
    """Every knob, with its default. Field `rate_limit_per_min` is env `RATE_LIMIT_PER_MIN`."""

    port: Annotated[int, Meta(ge=0, le=65535)] = 4000
    host: str = "0.0.0.0"
    db_path: str = "gateway.db"
    registry_path: str = "registry.json"
    offline_ttl_s: Annotated[float, Meta(ge=0)] = 86400.0
    offline_max_messages: PositiveInt = 10000
    offline_max_bytes: PositiveInt = 268435456
    confirm_interval_s: PositiveFloat = 1.0
    redis_url: str | None = None
    presence_ttl_s: PositiveFloat = 10.0
    gateway_admin_token: str | None = None
    payload_policy: Literal["mesh", "passthrough"] = "mesh"
    rate_limit_per_min: PositiveInt = 60
    max_frame_bytes: PositiveInt = 10240
    ws_max_bytes: PositiveInt = 1048576
    send_buffer_bytes: PositiveInt = 1048576
    auth_timeout_s: PositiveFloat = 10.0
    ping_interval_s: PositiveFloat = 20.0
    ping_timeout_s: PositiveFloat = 20.0
    ws_per_message_deflate: bool = False
    max_connections: PositiveInt = 20000
    max_pending_auth: PositiveInt = 1000
    auth_failures_per_min: PositiveInt = 10
    register_per_min: PositiveInt = 20
    max_meshes: PositiveInt = 100000
    update_rate_per_min: PositiveInt = 30
    forwarded_allow_ips: str = "127.0.0.1"  # uvicorn's setting: whose X-Forwarded-For is believed
    metrics_port: Annotated[int, Meta(ge=1, le=65535)] | None = None
    log_refusals_per_s: PositiveInt = 20
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = "text"

    def __post_init__(self) -> None:
        if self.redis_url is not None and not re.fullmatch(r"(rediss?|unix)://\S+", self.redis_url):
            raise ValueError(f"REDIS_URL={self.redis_url!r} is not a redis://, rediss:// or unix:// URL")
        if self.ws_max_bytes < self.max_frame_bytes:
            raise ValueError(f"WS_MAX_BYTES={self.ws_max_bytes} is below MAX_FRAME_BYTES={self.max_frame_bytes}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """The only code that reads the environment. Empty values count as unset."""
        names = [name.upper() for name in cls.__struct_fields__]
        raw = {name: environ[name] for name in names if environ.get(name)}
        for name in ("PAYLOAD_POLICY", "LOG_LEVEL", "LOG_FORMAT"):
            if name in raw:
                raw[name] = raw[name].strip().lower()
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            found = re.search(r"`\$\.(\w+)`", str(exc))
            if found is None:
                raise SettingsError(f"invalid settings: {exc}") from None
            name = found.group(1)
            raise SettingsError(f"invalid setting {name}={raw[name]!r}: {exc}") from None


# --- Protocol ---------------------------------------------------------------
# One Struct per frame; the wire tags are the contract, never derived from names.

FrameId = Annotated[str, Meta(max_length=64)]


class Frame(Struct, tag_field="type", rename="camel"):
    pass


class Participant(Struct):
    id: str
    name: str
    type: str


class Auth(Frame, tag="gateway_auth"):
    mesh_id: str
    secret: str
    participants: list[Participant] = []
    public_rooms: list[str] = []
    id: FrameId | None = None  # only echoed on an `already_authenticated` error


class Discover(Frame, tag="gateway_discover"):
    pass


# The payload type depends on PAYLOAD_POLICY: `MeshPayload` or any JSON object.
P = TypeVar("P")
T = TypeVar("T")


class Relay(Frame, Generic[P], tag="gateway_relay"):
    target_mesh_id: str
    payload: P
    id: FrameId | None = None


class Broadcast(Frame, Generic[P], tag="gateway_broadcast"):
    payload: P
    id: FrameId | None = None


class UpdateParticipants(Frame, tag="gateway_update_participants"):
    participants: list[Participant]


class UpdateRooms(Frame, tag="gateway_update_rooms"):
    public_rooms: list[str]


class ChatMessage(Struct, omit_defaults=True, rename="camel"):
    """PAYLOAD_POLICY=mesh: decoding into this struct *is* the whitelist (other keys are dropped)."""

    id: Any = UNSET
    room_id: Any = UNSET
    sender_id: Any = UNSET
    sender_name: Any = UNSET
    content: Any = UNSET
    is_dm: Any = UNSET
    created_at: Any = UNSET
    from_mesh: Any = UNSET
    from_mesh_id: Any = UNSET
    room_name: Any = UNSET
    trust_level: Any = UNSET  # always rewritten to "federated"


class MeshPayload(Struct, omit_defaults=True):
    type: Any = UNSET
    message: ChatMessage | list[Any] | str | int | float | bool | UnsetType | None = UNSET


# Every frame a node sends: a new frame type is its Struct, its name here, and a case in `dispatch`.
ClientFrame = Auth | Discover | Relay[Any] | Broadcast[Any] | UpdateParticipants | UpdateRooms


def frame_class(member: Any) -> type[Frame]:
    """`Relay` for `Relay[Any]`: the class of a member of the union."""
    cls: type[Frame] = typing.get_origin(member) or member
    return cls


def with_payload(payload: Any) -> Any:
    """ClientFrame with the relayed payloads decoded as `payload` (a PAYLOAD_POLICY's type)."""
    members = (origin[payload] if (origin := typing.get_origin(m)) else m for m in typing.get_args(ClientFrame))
    return typing.Union[tuple(members)]  # noqa: UP007 (a union built at run time)


CLIENT_TAGS = frozenset(frame_class(member).__struct_config__.tag for member in typing.get_args(ClientFrame))


class AuthOk(Frame, tag="gateway_auth_ok"):
    mesh_id: str
    name: str


class AuthError(Frame, tag="gateway_auth_error", omit_defaults=True):
    message: str
    retry_after_ms: int | None = None  # "Too many attempts": when to try again


class Instance(Struct, rename="camel"):
    mesh_id: str
    name: str
    public_rooms: list[str]


class DiscoverResult(Frame, tag="gateway_discover_result"):
    instances: list[Instance]


class Incoming(Frame, tag="gateway_incoming"):
    from_mesh_id: str
    from_mesh_name: str
    payload: Any


class ParticipantGroup(Struct, rename="camel"):
    mesh_id: str
    mesh_name: str
    participants: list[Participant]


class Participants(Frame, tag="gateway_participants"):
    remote_participants: list[ParticipantGroup]


class Error(Frame, tag="error", omit_defaults=True):
    message: str
    code: str
    id: str | None = None
    target_mesh_id: str | None = None
    retry_after_ms: int | None = None
    count: int | None = None  # messages_dropped: how many


class Ack(Frame, tag="gateway_ack"):
    id: str
    delivered: int  # meshes the frame was handed to
    queued: int = 0  # away meshes it was kept for


class FrameHead(Struct):
    """What an undecodable frame still tells us: its type and id, if any."""

    type: Any = None
    id: Any = None


FRAME_DECODERS = {  # one per payload policy, built once
    "mesh": msgspec.json.Decoder(with_payload(MeshPayload)),
    "passthrough": msgspec.json.Decoder(with_payload(dict[str, Any])),
}
head_decoder = msgspec.json.Decoder(FrameHead)
encoder = msgspec.json.Encoder()

# Error codes (stable, part of the protocol).
INVALID_JSON = "invalid_json"
INVALID_FRAME = "invalid_frame"
UNKNOWN_TYPE = "unknown_type"
FRAME_TOO_LARGE = "frame_too_large"
ALREADY_AUTHENTICATED = "already_authenticated"
TARGET_OFFLINE = "target_offline"
RATE_LIMITED = "rate_limited"
BACKPLANE_UNAVAILABLE = "backplane_unavailable"
MESSAGES_DROPPED = "messages_dropped"

# Every frame the hub relays starts so (a tagged struct encodes its tag first): the frames a
# socket must give back to the mailbox when it ends unconfirmed.
INCOMING_PREFIX = b'{"type":"gateway_incoming"'

# Close codes (also in README.md).
CLOSE_POLICY = 1008  # bad credentials, auth timeout
CLOSE_TOO_BIG = 1009  # message over WS_MAX_BYTES
CLOSE_INTERNAL = 1011  # unexpected server error (uvicorn also uses it for ping timeout)
CLOSE_RESTART = 1012  # gateway shutting down: reconnect
CLOSE_TRY_AGAIN = 1013  # send buffer full, or backplane down during auth
CLOSE_REPLACED = 4000  # a newer connection authenticated as this mesh
CLOSE_UNREGISTERED = 4001  # the mesh was deleted


def federate(payload: Any) -> Any:
    """A relayed chat message is never trusted as local on the receiving mesh."""
    if isinstance(payload, MeshPayload) and isinstance(payload.message, ChatMessage):
        payload.message.trust_level = "federated"
    return payload


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def decode_frame(data: str | bytes, decoder: msgspec.json.Decoder[Any] = FRAME_DECODERS["mesh"]) -> ClientFrame | Error:
    """One message off the socket: a typed frame, or the error frame that answers it."""
    if isinstance(data, bytes):  # binary frames must hold UTF-8 JSON too
        try:
            data = data.decode()
        except UnicodeDecodeError as exc:
            return Error(message=f"invalid JSON: binary frame is not UTF-8 ({exc.reason})", code=INVALID_JSON)
    try:
        frame: ClientFrame = decoder.decode(data)
    except msgspec.DecodeError as exc:
        return decode_error(data, exc)
    return frame


def read_head(data: str | bytes) -> FrameHead | None:
    try:
        return head_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


def decode_error(data: str, exc: msgspec.DecodeError) -> Error:
    """Classify a frame that failed to decode (the slow path only bad frames take)."""
    head = read_head(data)
    frame_id = frame_id_of(head)
    if not isinstance(exc, msgspec.ValidationError):
        return Error(message=f"invalid JSON: {exc}", code=INVALID_JSON)
    if head is not None and isinstance(head.type, str) and head.type not in CLIENT_TAGS:
        return Error(message=f"unknown frame type {head.type!r}", code=UNKNOWN_TYPE, id=frame_id)
    return Error(message=f"invalid frame: {exc}", code=INVALID_FRAME, id=frame_id)


def frame_id_of(head: FrameHead | None) -> str | None:
    if head is not None and isinstance(head.id, str) and len(head.id) <= 64:
        return head.id
    return None


# --- Registry ---------------------------------------------------------------
# Where meshes and their hashed secrets live. Secrets are hashed with salted
# PBKDF2-HMAC-SHA256, off the event loop; the cost is sized so 5,000 meshes
# reconnecting at once all authenticate within 10 s on one core.

PBKDF2_ITERATIONS = 1000
LEGACY_HEX = re.compile(r"[0-9a-fA-F]{64}")


class Mesh(Struct, frozen=True, rename="camel"):
    """One registration, as stored. `secret_hash` is never the secret."""

    mesh_id: str
    name: str
    secret_hash: str
    created: float | None = None


def hash_secret(secret: str, *, iterations: int = PBKDF2_ITERATIONS) -> str:
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def verify_secret(secret: str, secret_hash: str) -> bool:
    """Constant-time check against our salted hash or the Node gateway's bare SHA-256 hex."""
    if LEGACY_HEX.fullmatch(secret_hash):
        return hmac.compare_digest(hashlib.sha256(secret.encode()).hexdigest(), secret_hash.lower())
    try:
        scheme, iterations, salt, digest = secret_hash.split("$")
        computed = hashlib.pbkdf2_hmac("sha256", secret.encode(), bytes.fromhex(salt), int(iterations))
    except ValueError:
        log.error("unreadable secret hash in registry")
        return False
    return scheme == "pbkdf2_sha256" and hmac.compare_digest(computed.hex(), digest)


def is_legacy(secret_hash: str) -> bool:
    return LEGACY_HEX.fullmatch(secret_hash) is not None


# Checked once at start, so the hashing processes are warm before the first auth.
WARM_UP_HASH = hash_secret("not-a-real-secret")


def hash_batch(jobs: list[tuple[str, str | None]]) -> list[str | bool]:
    """In a worker process: hash each secret (no stored hash given) or verify it."""
    return [hash_secret(secret) if stored is None else verify_secret(secret, stored) for secret, stored in jobs]


LENGTH = struct.Struct("!I")  # the hashing processes' framing: a length, then a pickle


def hash_worker(sock: socket.socket) -> None:
    """A hashing process: answers each batch its gateway writes to `sock` with the batch's
    results. The gateway holds the socket's only other end, so when the gateway exits, even
    killed with SIGKILL, `sock` reads end of file and the process exits."""
    with sock, sock.makefile("rb") as reader:
        while len(head := reader.read(LENGTH.size)) == LENGTH.size:
            answer = pickle.dumps(hash_batch(pickle.loads(reader.read(LENGTH.unpack(head)[0]))))
            sock.sendall(LENGTH.pack(len(answer)) + answer)


def reap(process: multiprocessing.process.BaseProcess | None) -> None:
    """Wait for a hashing process to exit (it does once its socket closes), killing it after 5 s."""
    if process is not None:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()


class HasherGone(Exception):
    """A hashing process died with a batch in hand: that batch fails, a new process takes over."""


class HashWorker(asyncio.Protocol):
    """The gateway's end of one hashing process: one batch in flight, its answer read by the
    event loop itself (no thread)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.process: multiprocessing.process.BaseProcess | None = None
        self.answer: asyncio.Future[list[Any]] | None = None
        self.received = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received += data
        received = len(self.received)
        if received >= LENGTH.size and received >= LENGTH.size + LENGTH.unpack_from(self.received)[0]:
            results = pickle.loads(self.received[LENGTH.size :])
            self.received.clear()
            if self.answer is not None and not self.answer.done():
                self.answer.set_result(results)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(HasherGone(f"hashing process {self.pid} exited"))

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def run(self, jobs: list[tuple[str, str | None]]) -> list[Any]:
        assert self.transport is not None, "the hashing process is not running"
        self.answer = asyncio.get_running_loop().create_future()
        request = pickle.dumps(jobs)
        self.transport.write(LENGTH.pack(len(request)) + request)
        return await self.answer


class Hasher:
    """Hashes and checks secrets in worker processes, in batches.

    Off the event loop so one auth never stalls other meshes. Processes, not
    threads: a hashing thread must win the GIL back from a busy event loop after
    every secret (up to 5 ms each), which made a reconnect storm of 5,000 meshes
    take 14 s; a batch of secrets costs the loop one hand-off. (Lowering the
    workers' priority starved them behind the loop: 14.6 s, against 8.6 s.)
    Each process talks over a socket pair the event loop reads itself: a
    `ProcessPoolExecutor` adds a manager thread and a feeder thread, whose GIL hand-offs
    doubled a legit mesh's auth p99 during a flood of guesses (measured: 121 ms against
    58 ms with the hashing done in the loop; the bench's `guess-flood`).

    Except: a check the caller marks `urgent` (a registered mesh, no failed attempts on its
    meshId or IP) is done at once on the loop, up to INLINE_PER_S a second (0.4 ms each). A
    round trip to a process costs a few loop turns and a wake-up of a process that shares
    the CPU. Measured in the bench's paced guess-flood with 600 probes (trials): a legit
    auth's p95 / p99 was 4.8-14.8 / 23-48 ms over four runs through the processes, 5.2-9.0 /
    21-30 ms over three with this. Past the budget, as in a reconnect storm, urgent checks
    go to the processes too (with every check on the loop, the 5,000-mesh storm took 6.9 s,
    against 4.2-5.1 s).
    """

    BATCH = 64
    INLINE_PER_S = 100

    def __init__(self, workers: int = 2) -> None:
        self.workers = [HashWorker() for _ in range(workers)]
        self.inline = PerSecond(self.INLINE_PER_S)
        self.jobs: deque[tuple[str, str | None, asyncio.Future[Any]]] = deque()
        self.wakeup = asyncio.Event()
        self.drainers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for worker in self.workers:
            await self._start(worker)
        self.drainers = [asyncio.create_task(self._drain(worker)) for worker in self.workers]
        await self.verify("warm-up", WARM_UP_HASH)

    async def hash(self, secret: str) -> str:
        return str(await self._submit(secret, None))

    async def verify(self, secret: str, secret_hash: str, *, urgent: bool = False) -> bool:
        if urgent and self.inline.allow():
            return verify_secret(secret, secret_hash)
        return bool(await self._submit(secret, secret_hash))

    async def close(self) -> None:
        for drainer in self.drainers:
            drainer.cancel()
        for worker in self.workers:
            if worker.transport is not None:
                worker.transport.close()  # the process reads end of file and exits
        for worker in self.workers:
            await asyncio.to_thread(reap, worker.process)

    async def _start(self, worker: HashWorker) -> None:
        # Workers fork from a fork server: a clean process (no event loop, no threads) that imported
        # this module once. Never fork the running gateway; and spawning two fresh interpreters per
        # start cost 0.2 s (0.5 s of CPU), a fork costs milliseconds.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        ours, theirs = socket.socketpair()
        with theirs:
            process = context.Process(target=hash_worker, args=(theirs,), name="mesh-gateway-hash", daemon=True)
            await asyncio.to_thread(process.start)  # the fork server's first start takes a while
        worker.process, worker.received = process, bytearray()
        await asyncio.get_running_loop().connect_accepted_socket(lambda: worker, ours)

    async def _restart(self, worker: HashWorker) -> None:
        while True:
            try:
                await asyncio.to_thread(reap, worker.process)
                await self._start(worker)
                return
            except (OSError, EOFError) as exc:  # the fork server itself is gone: a new one next time
                log.error("a hashing process could not start (%s): retrying in 1 s", exc)
                await asyncio.sleep(1)

    async def _submit(self, secret: str, stored: str | None) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.jobs.append((secret, stored, future))
        self.wakeup.set()
        return await future

    async def _drain(self, worker: HashWorker) -> None:
        while True:
            if not self.jobs:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            if worker.transport is None:  # it exited (or could not start) while idle: a new one first
                log.error("hashing process %s exited: starting a new one", worker.pid)
                await self._restart(worker)
                continue
            batch = [self.jobs.popleft() for _ in range(min(self.BATCH, len(self.jobs)))]
            try:
                results = await worker.run([(s, h) for s, h, _ in batch])
            except HasherGone as exc:  # fail this batch (never hang it); a new process takes the next
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (*_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


class RegistryFull(Exception):
    """MAX_MESHES meshes are registered: a new one is refused (507)."""


class Registry(Protocol):
    """Compare-and-set storage: every write names the entry it expects to replace."""

    async def get(self, mesh_id: str) -> Mesh | None: ...

    async def put(self, mesh: Mesh, *, expect: Mesh | None) -> bool:
        """Write `mesh` if the entry is still `expect`; a new one past MAX_MESHES raises RegistryFull."""
        ...

    async def delete(self, mesh: Mesh) -> bool: ...

    async def listing(self, *, after: str, limit: int) -> list[MeshInfo]:
        """Registered meshes in meshId order after `after` (admin listing)."""
        ...

    async def close(self) -> None: ...


class MeshInfo(Struct, rename="camel"):
    """One line of the admin listing (never the secret's hash)."""

    mesh_id: str
    name: str
    created: float | None
    last_seen: float | None
    kept: int
    connected: bool = False


class Mailboxes(Protocol):
    """Where frames wait for away meshes: SqliteStore, or RedisMailboxes with REDIS_URL.
    Every call resolves once its change is durable."""

    readers: set[str]  # the away meshes now: a broadcast is kept when one of them is not its sender
    queued: int  # frames kept, for /health
    refresh_s: float  # how often `refresh` runs
    dropped: int  # frames dropped past the bounds, so far (metrics)
    expired: int  # frames expired past OFFLINE_TTL_S, so far (metrics)

    def keep(self, sender: str, target: str | None, frame: bytes) -> asyncio.Future[int]:
        """Keep a relay for `target` if it is away, or a broadcast (target None) for every away mesh
        but the sender: resolves to how many meshes it was kept for (0: nobody away)."""
        ...

    def arrive(self, mesh_id: str, requeue: Requeue | None) -> asyncio.Future[Arrival]:
        """A mesh authenticated (`requeue`: what its replaced socket held): where its mailbox
        lies; nothing more is kept for it until it leaves."""
        ...

    def read(self, mesh_id: str, after: int, end: int, limit: int) -> asyncio.Future[list[tuple[int, bytes]]]:
        """Up to `limit` kept frames after `after`, broadcasts up to `end`, oldest first."""
        ...

    def spill(self, mesh_id: str, frames: list[bytes]) -> asyncio.Future[None]:
        """Live frames that waited behind a long catch-up: appended to the mailbox being read."""
        ...

    def confirm(self, mesh_id: str, seq: int, *, count: int = 0, caught_up: bool = False) -> asyncio.Future[None]:
        """The node confirmed `count` kept frames, up to `seq` (caught_up: and has nothing left to read)."""
        ...

    def leave(self, mesh_id: str, requeue: Requeue) -> asyncio.Future[None]:
        """A mesh's socket ended: it is away, with what the socket held first in its mailbox."""
        ...

    def refresh(self, live: list[str]) -> asyncio.Future[list[str]]:
        """Periodic: `live` meshes were seen now; expire frames and meshes past OFFLINE_TTL_S."""
        ...

    async def lost(self, mesh_id: str) -> None:
        """A mesh on another process vanished without leaving (that process died): it is away now."""


class Put(Struct, tag="put", tag_field="op"):
    mesh: Mesh


class Delete(Struct, tag="delete", tag_field="op", rename="camel"):
    mesh_id: str


journal_decoder = msgspec.json.Decoder(Put | Delete)


def read_registry_file(path: str) -> tuple[list[Mesh], str]:
    """A registry file to import, and a digest of its content. The Node gateway's format (a
    list of `{meshId, secretHash, name}`, or an object keyed by meshId) or our earlier one
    (the same plus `created`, with a `<path>.journal` of later changes)."""
    with open(path, "rb") as file:
        data = file.read()
    try:
        with open(f"{path}.journal", "rb") as file:
            journal = file.read()
    except FileNotFoundError:
        journal = b""
    try:
        raw = msgspec.json.decode(data) if data.strip() else []
        if isinstance(raw, dict):
            raw = [{"meshId": key, **value} for key, value in raw.items()]
        meshes = {mesh.mesh_id: mesh for mesh in msgspec.convert(raw, list[Mesh])}
    except (msgspec.DecodeError, TypeError) as exc:  # refuse to start rather than import half of it
        raise RuntimeError(f"registry file {path} is unreadable ({exc}): fix it or move it away") from None
    lines = journal.split(b"\n")
    for number, line in enumerate(lines, 1):
        try:
            change = journal_decoder.decode(line)
        except msgspec.DecodeError:
            if number < len(lines) - 1 and line.strip():  # only a torn last line (never acknowledged) is skipped
                raise RuntimeError(f"registry journal {path}.journal is unreadable at line {number}") from None
            continue
        match change:
            case Put(mesh=mesh):
                meshes[mesh.mesh_id] = mesh
            case Delete(mesh_id=mesh_id):
                meshes.pop(mesh_id, None)
    return list(meshes.values()), hashlib.sha256(data + b"\0" + journal).hexdigest()


# --- Store: the registry and the offline mailboxes in one SQLite database ---------
# One writer thread owns the writing connection; the event loop hands it jobs and awaits
# their futures (registry lookups alone read on the loop, from a read-only connection).
# Jobs queued meanwhile run in one transaction and share one commit (group commit), so
# 5,000 concurrent registrations cost a few fsyncs, not 5,000. WAL + synchronous=FULL: a
# commit is on disk before its answer.

SCHEMA = """
CREATE TABLE IF NOT EXISTS meshes (
    mesh_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created REAL NOT NULL,
    last_seen REAL,                      -- last connected; NULL = never authenticated
    cursor INTEGER NOT NULL DEFAULT 0,   -- mailbox position in `kept` (frames up to it are not this mesh's)
    dropped INTEGER NOT NULL DEFAULT 0   -- frames dropped past the bounds, told on next auth
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kept (        -- one shared log: relays (target set) and broadcasts (target NULL)
    seq INTEGER PRIMARY KEY,
    target TEXT,
    sender TEXT NOT NULL,
    at REAL NOT NULL,
    frame BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS kept_target ON kept (target, seq);
CREATE TABLE IF NOT EXISTS imported (digest TEXT PRIMARY KEY) WITHOUT ROWID;
"""

# A mesh's mailbox: what was relayed to it, and the broadcasts of others, after its cursor.
MAILBOX = "seq > ? AND (target = ? OR (target IS NULL AND sender != ? AND seq <= ?)) AND at >= ?"
NO_END = 2**62  # a mailbox bound that excludes nothing


class StoreError(OSError):
    """The database refused a change (disk full, unwritable folder): nothing was acknowledged."""


class Arrival(Struct, frozen=True):
    """What a mesh that just authenticated catches up on: its kept frames in (cursor, end]."""

    cursor: int
    end: int
    dropped: int


Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]
Done = tuple["asyncio.Future[Any]", Any, BaseException | None]


# Futures a store batch resolves per loop turn: each wakes a task whose next step runs in the
# following turn, so a batch of 4,096 jobs in a reconnect storm (arrivals, leaves) would otherwise
# make one turn of 4,096 task steps (measured: the connected meshes' worst stall in that storm).
SETTLE_PER_TURN = 64


GET_MESH = "SELECT mesh_id, name, secret_hash, created FROM meshes WHERE mesh_id = ?"


class SqliteStore:
    """The embedded default: registry and mailboxes in the SQLite file at DB_PATH.

    Mailboxes are a shared log (`kept`) plus each away mesh's position in it, so
    a broadcast is stored once however many meshes are away. Nothing is written
    while every mesh is connected, only for away (or returning) meshes.
    """

    CHECK_EVERY_S = 10.0  # TTL expiry and last-seen refresh

    def __init__(self, settings: Settings) -> None:
        self.path = settings.db_path
        self.ttl = settings.offline_ttl_s
        self.max_messages = settings.offline_max_messages
        self.max_bytes = settings.offline_max_bytes
        self.readers: set[str] = set()  # event loop: the away meshes a broadcast is kept for
        self.queued = 0  # event loop: kept frames, as of the last batch
        self.refresh_s = min(self.CHECK_EVERY_S, self.ttl / 4)
        self.dropped = self.expired = 0  # written by the writer thread, read by metrics
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: sqlite3.Connection | None = None  # event loop: registry lookups (see `get`)
        # Thread side (only the writer thread touches these):
        self._db: sqlite3.Connection | None = None
        self._away: dict[str, int] = {}  # away mesh -> cursor
        self._seen: dict[str, float] = {}  # away mesh -> last connected
        self._catching: dict[str, int] = {}  # returning mesh -> cursor (its rows are still needed)
        self._reading: dict[str, int] = {}  # returning mesh -> kept frames it has not confirmed yet
        self._count: dict[str, int] = {}  # away mesh -> frames in its mailbox
        self._bytes = 0
        self._meshes = 0  # registered
        self.max_meshes = settings.max_meshes
        self._checkpoint = False

    # --- the writer thread ---

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._drain, name="mesh-gateway-db", daemon=True)
        self._thread.start()
        self.readers = set(await self.call(self._open))
        self.queued = sum(self._count.values())
        self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._reader.execute("PRAGMA query_only=ON")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._thread is None:
            return
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run `fn(*args)` in the writer thread, in this batch's transaction; resolves once committed."""
        assert self._loop is not None, "the store is not started"
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((fn, args, future))
        return future

    def _drain(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 4096:
                    job = self._jobs.get_nowait()
                    if job is None:
                        self._jobs.put(None)  # stop after this batch
                        break
                    batch.append(job)
            self._settle(self._run(batch))
        if self._db is not None:
            self._db.close()

    def _run(self, batch: list[Job]) -> list[Done]:
        """Every job of a batch in one transaction, each in a savepoint (a failed job is undone alone)."""
        if self._db is None:  # only `_open` runs before the database is open
            return [self._attempt(fn, args, future) for fn, args, future in batch]
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            done = []
            for fn, args, future in batch:
                db.execute("SAVEPOINT job")
                done.append(self._attempt(fn, args, future))
                db.execute("ROLLBACK TO job" if done[-1][2] is not None else "RELEASE job")
                if done[-1][2] is not None:
                    db.execute("RELEASE job")
            self._enforce_bytes()
            db.execute("COMMIT")
        except sqlite3.Error as exc:  # the commit failed: nothing in this batch happened
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            log.error("database %s: commit failed: %s", self.path, exc)
            with contextlib.suppress(sqlite3.Error):
                self._reload()
            return [(future, None, StoreError(f"database {self.path}: {exc}")) for _, _, future in batch]
        if self._checkpoint:  # a legacy hash was replaced: leave no copy in the WAL or free pages
            self._checkpoint = False
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return done

    def _attempt(self, fn: Callable[..., Any], args: tuple[Any, ...], future: asyncio.Future[Any]) -> Done:
        try:
            return (future, fn(*args), None)
        except (sqlite3.Error, OSError) as exc:
            return (future, None, StoreError(f"database {self.path}: {exc}"))
        except RegistryFull as exc:
            return (future, None, exc)
        except Exception as exc:  # a bug in one job fails that job, never the writer thread
            log.exception("database job %s failed", getattr(fn, "__name__", fn))
            return (future, None, exc)

    def _settle(self, done: list[Done]) -> None:
        queued = sum(self._count.values()) + sum(self._reading.values())
        assert self._loop is not None

        def settle(start: int = 0) -> None:  # one hand-off to the loop per batch, SETTLE_PER_TURN a turn
            self.queued = queued
            for future, result, error in done[start : start + SETTLE_PER_TURN]:
                if future.done():
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)
            if start + SETTLE_PER_TURN < len(done):
                asyncio.get_running_loop().call_soon(settle, start + SETTLE_PER_TURN)

        with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter exit)
            self._loop.call_soon_threadsafe(settle)

    def _open(self) -> list[str]:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a commit is fsynced before it is answered
            db.execute("PRAGMA secure_delete=ON")  # freed pages are zeroed (no old secret hash lingers)
            db.executescript(SCHEMA)
        except sqlite3.Error:
            db.close()
            raise
        self._db = db
        self._reload()
        return list(self._away)

    def _reload(self) -> None:
        """Rebuild the mailbox state from the database (at start, and after a failed commit)."""
        db = self._db
        assert db is not None
        since = time.time() - self.ttl
        rows = db.execute("SELECT mesh_id, cursor, last_seen FROM meshes WHERE last_seen > ?", (since,)).fetchall()
        catching = {mesh_id for mesh_id in self._catching}
        self._away = {mesh_id: cursor for mesh_id, cursor, _ in rows if mesh_id not in catching}
        self._seen = {mesh_id: seen for mesh_id, _, seen in rows if mesh_id not in catching}
        self._count = {mesh_id: self._mailbox_size(mesh_id, cursor) for mesh_id, cursor in self._away.items()}
        self._bytes = db.execute("SELECT coalesce(sum(length(frame)), 0) FROM kept").fetchone()[0]
        self._meshes = db.execute("SELECT count(*) FROM meshes").fetchone()[0]

    def _db_(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("database not open")
        return self._db

    def _mailbox_size(self, mesh_id: str, cursor: int, end: int = NO_END) -> int:
        query = f"SELECT count(*) FROM kept WHERE {MAILBOX}"
        return int(self._db_().execute(query, (cursor, mesh_id, mesh_id, end, time.time() - self.ttl)).fetchone()[0])

    def _last_seq(self) -> int:
        return int(self._db_().execute("SELECT coalesce(max(seq), 0) FROM kept").fetchone()[0])

    # --- registry (Registry protocol) ---

    async def get(self, mesh_id: str) -> Mesh | None:
        """Read on the event loop itself, from a read-only connection: in WAL mode a reader never
        waits for the writer, and a lookup by key takes microseconds. Every auth and every guess
        looks one up; through the writer thread a lookup took 7-16 ms during a flood of guesses."""
        if self._reader is None:
            raise StoreError(f"database {self.path}: not open")
        try:  # fetchall: the statement runs to its end, so no read transaction stays open
            rows = self._reader.execute(GET_MESH, (mesh_id,)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"database {self.path}: {exc}") from exc
        return Mesh(*rows[0]) if rows else None

    async def put(self, mesh: Mesh, *, expect: Mesh | None) -> bool:
        return await self.call(self._put, mesh, expect, is_legacy(expect.secret_hash) if expect else False)

    async def delete(self, mesh: Mesh) -> bool:
        return await self.call(self._delete, mesh)

    @property
    def registered(self) -> int:
        return self._meshes

    async def listing(self, *, after: str, limit: int) -> list[MeshInfo]:
        return await self.call(self._listing, after, limit)

    def _listing(self, after: str, limit: int) -> list[MeshInfo]:
        rows = (
            self._db_()
            .execute(
                "SELECT mesh_id, name, created, last_seen FROM meshes WHERE mesh_id > ? ORDER BY mesh_id LIMIT ?",
                (after, limit),
            )
            .fetchall()
        )
        kept = self._count | self._reading
        return [MeshInfo(m, name, created, seen, kept.get(m, 0)) for m, name, created, seen in rows]

    async def import_file(self, path: str) -> None:
        """Add the meshes of a registry file the database lacks, once per file content."""
        try:
            meshes, digest = await asyncio.to_thread(read_registry_file, path)
        except FileNotFoundError:
            return
        added = await self.call(self._import, meshes, digest)
        if added is not None:
            log.info("imported %d of %d meshes from %s", added, len(meshes), path)

    def _get(self, mesh_id: str) -> Mesh | None:
        row = self._db_().execute(GET_MESH, (mesh_id,)).fetchone()
        return None if row is None else Mesh(*row)

    def _put(self, mesh: Mesh, expect: Mesh | None, legacy: bool) -> bool:
        if self._get(mesh.mesh_id) != expect:
            return False
        if expect is None and self._meshes >= self.max_meshes:
            raise RegistryFull
        self._meshes += expect is None
        self._db_().execute(
            "INSERT INTO meshes (mesh_id, name, secret_hash, created) VALUES (?, ?, ?, ?) ON CONFLICT (mesh_id)"
            " DO UPDATE SET name = excluded.name, secret_hash = excluded.secret_hash, created = excluded.created",
            (mesh.mesh_id, mesh.name, mesh.secret_hash, mesh.created or time.time()),
        )
        self._checkpoint |= legacy
        return True

    def _delete(self, mesh: Mesh) -> bool:
        if self._get(mesh.mesh_id) != mesh:
            return False
        db = self._db_()
        db.execute("DELETE FROM meshes WHERE mesh_id = ?", (mesh.mesh_id,))
        self._meshes -= 1
        self._discard(mesh.mesh_id)
        return True

    def _import(self, meshes: list[Mesh], digest: str) -> int | None:
        db = self._db_()
        if db.execute("SELECT 1 FROM imported WHERE digest = ?", (digest,)).fetchone():
            return None
        before = db.total_changes
        db.executemany(
            "INSERT OR IGNORE INTO meshes (mesh_id, name, secret_hash, created) VALUES (?, ?, ?, ?)",
            [(m.mesh_id, m.name, m.secret_hash, m.created or time.time()) for m in meshes],
        )
        added = db.total_changes - before
        self._meshes += added
        db.execute("INSERT INTO imported (digest) VALUES (?)", (digest,))
        return added

    # --- mailboxes (Mailboxes protocol) ---

    def keep(self, sender: str, target: str | None, frame: bytes) -> asyncio.Future[int]:
        """Keep a relay for `target` if it is away, or a broadcast for every away mesh but
        the sender; resolves (once durable) to the number of meshes it was kept for."""
        return self.call(self._keep, sender, target, frame)

    def arrive(self, mesh_id: str, requeue: Requeue | None) -> asyncio.Future[Arrival]:
        """A mesh authenticated: its mailbox is (cursor, end]; from now on nothing more is kept for it."""
        self.readers.discard(mesh_id)
        return self.call(self._arrive, mesh_id, requeue)

    def read(self, mesh_id: str, after: int, end: int, limit: int) -> asyncio.Future[list[tuple[int, bytes]]]:
        return self.call(self._read, mesh_id, after, end, limit)

    def spill(self, mesh_id: str, frames: list[bytes]) -> asyncio.Future[None]:
        return self.call(self._spill, mesh_id, frames)

    def confirm(self, mesh_id: str, seq: int, *, count: int = 0, caught_up: bool = False) -> asyncio.Future[None]:
        return self.call(self._confirm, mesh_id, seq, count, caught_up)

    def leave(self, mesh_id: str, requeue: Requeue) -> asyncio.Future[None]:
        """A mesh's socket ended: it is away, its unconfirmed frames first in its mailbox."""
        self.readers.add(mesh_id)
        return self.call(self._leave, mesh_id, requeue)

    def refresh(self, live: list[str]) -> asyncio.Future[list[str]]:
        """Periodic: live meshes were seen now; expire old frames and meshes away too long."""
        future = self.call(self._refresh, live)
        future.add_done_callback(self._expired)
        return future

    async def lost(self, mesh_id: str) -> None:
        pass  # one process: every mesh is here, and leaves through `leave`

    def _expired(self, future: asyncio.Future[list[str]]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.readers.difference_update(future.result())

    def _keep(self, sender: str, target: str | None, frame: bytes) -> int:
        now = time.time()
        if target is not None:
            if target not in self._away or self._seen[target] <= now - self.ttl:
                return 0
            receivers = [target]
        else:
            receivers = [m for m, seen in self._seen.items() if m != sender and seen > now - self.ttl]
            if not receivers:
                return 0
        self._insert([(target, sender, now, frame)])
        for mesh_id in receivers:
            self._count[mesh_id] += 1
            if self._count[mesh_id] > self.max_messages:
                self._drop(mesh_id, self._count[mesh_id] - self.max_messages)
        return len(receivers)

    def _insert(self, rows: list[tuple[str | None, str, float, bytes]]) -> None:
        self._db_().executemany("INSERT INTO kept (target, sender, at, frame) VALUES (?, ?, ?, ?)", rows)
        self._bytes += sum(len(row[3]) for row in rows)

    def _arrive(self, mesh_id: str, requeue: Requeue | None) -> Arrival:
        db = self._db_()
        if requeue is not None:  # it replaced its own older socket: that one's frames come first
            self._leave(mesh_id, requeue)
        row = db.execute("SELECT dropped FROM meshes WHERE mesh_id = ?", (mesh_id,)).fetchone()
        dropped = row[0] if row else 0
        end = self._last_seq()
        cursor = self._away.pop(mesh_id, end)
        self._seen.pop(mesh_id, None)
        self._reading[mesh_id] = self._count.pop(mesh_id, 0)
        self._catching[mesh_id] = cursor
        db.execute(
            "UPDATE meshes SET last_seen = ?, cursor = ?, dropped = 0 WHERE mesh_id = ?", (time.time(), cursor, mesh_id)
        )
        return Arrival(cursor=cursor, end=end, dropped=dropped)

    def _spill(self, mesh_id: str, frames: list[bytes]) -> None:
        if mesh_id in self._catching:
            self._insert([(mesh_id, "", time.time(), frame) for frame in frames])
            self._reading[mesh_id] = self._reading.get(mesh_id, 0) + len(frames)

    def _read(self, mesh_id: str, after: int, end: int, limit: int) -> list[tuple[int, bytes]]:
        query = f"SELECT seq, frame FROM kept WHERE {MAILBOX} ORDER BY seq LIMIT ?"
        return self._db_().execute(query, (after, mesh_id, mesh_id, end, time.time() - self.ttl, limit)).fetchall()

    def _confirm(self, mesh_id: str, seq: int, count: int, caught_up: bool) -> None:
        if mesh_id in self._catching:
            self._catching[mesh_id] = max(self._catching[mesh_id], seq)
            self._reading[mesh_id] = max(0, self._reading.get(mesh_id, 0) - count)
            if caught_up:  # its broadcasts may be no one's now
                del self._catching[mesh_id]
                self._reading.pop(mesh_id, None)
                self._collect_broadcasts()
        self._db_().execute("UPDATE meshes SET cursor = max(cursor, ?) WHERE mesh_id = ?", (seq, mesh_id))
        self._delete_rows("target = ? AND seq <= ?", (mesh_id, seq))

    def _leave(self, mesh_id: str, requeue: Requeue) -> None:
        db = self._db_()
        now = time.time()
        if db.execute("SELECT 1 FROM meshes WHERE mesh_id = ?", (mesh_id,)).fetchone() is None:
            return  # unregistered meanwhile: its mailbox is gone
        if mesh_id not in self._away:
            # What the socket held, then what it had not read yet, then what waited behind that,
            # all after a new cursor: nothing older is this mesh's any more.
            cursor = self._last_seq()
            catching = mesh_id in self._catching  # it may not have read all of its mailbox
            unread = self._read(mesh_id, requeue.read, requeue.end, self.max_messages) if catching else []
            frames = [*requeue.held, *(bytes(frame) for _, frame in unread), *requeue.backlog]
            self._insert([(mesh_id, "", now, frame) for frame in frames])
            self._catching.pop(mesh_id, None)
            self._reading.pop(mesh_id, None)
            self._delete_rows("target = ? AND seq <= ?", (mesh_id, cursor))
            self._away[mesh_id] = cursor
            self._count[mesh_id] = len(frames)
            db.execute("UPDATE meshes SET cursor = ? WHERE mesh_id = ?", (cursor, mesh_id))
        elif requeue.held or requeue.backlog:
            self._insert([(mesh_id, "", now, frame) for frame in [*requeue.held, *requeue.backlog]])
            self._count[mesh_id] += len(requeue.held) + len(requeue.backlog)
        self._seen[mesh_id] = now
        db.execute("UPDATE meshes SET last_seen = ? WHERE mesh_id = ?", (now, mesh_id))
        if self._count[mesh_id] > self.max_messages:
            self._drop(mesh_id, self._count[mesh_id] - self.max_messages)

    def _discard(self, mesh_id: str) -> None:
        self._reading.pop(mesh_id, None)
        self._away.pop(mesh_id, None)
        self._seen.pop(mesh_id, None)
        self._count.pop(mesh_id, None)
        self._catching.pop(mesh_id, None)
        self._delete_rows("target = ?", (mesh_id,))

    def _refresh(self, live: list[str]) -> list[str]:
        db = self._db_()
        now = time.time()
        last = self._last_seq()
        db.executemany(
            "UPDATE meshes SET last_seen = ?, cursor = ? WHERE mesh_id = ?",
            [(now, self._catching.get(m, last), m) for m in live],
        )
        expired = [m for m, seen in self._seen.items() if seen <= now - self.ttl]
        for mesh_id in expired:
            self._discard(mesh_id)
        if expired_rows := self._delete_rows("at < ?", (now - self.ttl,)):
            self.expired += expired_rows
            self._count = {m: self._mailbox_size(m, cursor) for m, cursor in self._away.items()}
        self._collect()
        return expired

    def _delete_rows(self, where: str, args: tuple[Any, ...]) -> int:
        sizes = self._db_().execute(f"DELETE FROM kept WHERE {where} RETURNING length(frame)", args).fetchall()
        self._bytes -= sum(size for (size,) in sizes)
        return len(sizes)

    def _collect(self) -> None:
        """Kept frames no mesh will read any more go."""
        self._collect_broadcasts()
        stale = "target IS NOT NULL AND target NOT IN (SELECT value FROM json_each(?))"
        self._delete_rows(stale, (msgspec.json.encode([*self._away, *self._catching]).decode(),))

    def _collect_broadcasts(self) -> None:
        """Broadcasts every away or returning mesh is past are no one's any more."""
        cursors = [*self._away.values(), *self._catching.values()]
        self._delete_rows("target IS NULL AND seq <= ?", (min(cursors) if cursors else NO_END,))

    def _enforce_bytes(self) -> None:
        """Past OFFLINE_MAX_BYTES in all, the oldest frames of the fullest mailbox go (past
        OFFLINE_MAX_MESSAGES, those of that mailbox: see `_keep`); the mesh hears how many
        on its next auth."""
        while self._bytes > self.max_bytes and self._count:
            fullest = max(self._count, key=self._count.__getitem__)
            if self._count[fullest] == 0:
                break
            self._drop(fullest, max(1, self._count[fullest] // 16))
            self._collect()

    def _drop(self, mesh_id: str, n: int) -> None:
        db = self._db_()
        cursor = self._away[mesh_id]
        query = f"SELECT seq FROM kept WHERE {MAILBOX} ORDER BY seq LIMIT 1 OFFSET ?"
        row = db.execute(query, (cursor, mesh_id, mesh_id, NO_END, time.time() - self.ttl, n - 1)).fetchone()
        if row is None:
            return
        self._away[mesh_id] = row[0]
        self._count[mesh_id] -= n
        self.dropped += n
        self._delete_rows("target = ? AND seq <= ?", (mesh_id, row[0]))
        db.execute("UPDATE meshes SET cursor = ?, dropped = dropped + ? WHERE mesh_id = ?", (row[0], n, mesh_id))
        log.warning("mesh %s: mailbox full, dropped its %d oldest kept frames", mesh_id, n)


class Requeue(Struct, frozen=True):
    """What an ended socket must not lose, in order: `held` (sent and not confirmed, or
    still queued), its unread kept frames in (read, end], then `backlog` (live frames
    that waited behind them)."""

    held: list[bytes] = []
    read: int = 0
    end: int = 0
    backlog: list[bytes] = []


# --- Hub ----------------------------------------------------------------------
# The live connections. Each peer owns a bounded outbound queue and one writer
# (a loop callback, or a task under a host's own server); the hub only appends to
# queues, so it never awaits a slow peer.

# uvicorn pauses a socket's writes once its transport holds 64 KiB (asyncio's
# default high-water mark); that much of SEND_BUFFER_BYTES is left for it.
TRANSPORT_HIGH_WATER = 64 * 1024


class Close(Struct, frozen=True):
    code: int
    reason: str = ""


class TokenBucket:
    """`rate_per_min` tokens a minute, with that many as burst."""

    __slots__ = ("capacity", "per_second", "stamp", "tokens")

    def __init__(self, rate_per_min: int) -> None:
        self.capacity = float(rate_per_min)
        self.per_second = rate_per_min / 60.0
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> int:
        """0 if a token was taken, else the milliseconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0
        return math.ceil((1.0 - self.tokens) / self.per_second * 1000)

    def wait_ms(self) -> int:
        """The milliseconds until a token is available (0: one is), taking none."""
        tokens = self._now_tokens()
        return 0 if tokens >= 1.0 else math.ceil((1.0 - tokens) / self.per_second * 1000)

    def full(self) -> bool:
        return self._now_tokens() >= self.capacity

    def _now_tokens(self) -> float:
        return min(self.capacity, self.tokens + (time.monotonic() - self.stamp) * self.per_second)


class Throttle:
    """A token bucket per key (a meshId, a client IP): `rate_per_min` events a minute, that many
    as burst. Failed auths and wrong secrets take tokens; once a key has none it waits for the
    next (backoff), and nothing is checked meanwhile. Keys whose bucket is full again are
    forgotten, so memory stays bounded by the keys active within a minute."""

    PRUNE_AT = 100_000

    def __init__(self, rate_per_min: int) -> None:
        self.rate_per_min = rate_per_min
        self.buckets: dict[str, TokenBucket] = {}

    def clean(self, *keys: str) -> bool:
        """No key has failed lately (its bucket is full, or was forgotten)."""
        return all(key not in self.buckets or self.buckets[key].full() for key in keys)

    def wait_ms(self, *keys: str) -> int:
        return max((self.buckets[key].wait_ms() for key in keys if key in self.buckets), default=0)

    def take(self, *keys: str) -> int:
        """Count one event for each key; the wait (ms) if any key was already out of tokens."""
        if len(self.buckets) > self.PRUNE_AT:
            for key in [k for k, bucket in self.buckets.items() if bucket.full()]:
                del self.buckets[key]
        return max(self.buckets.setdefault(key, TokenBucket(self.rate_per_min)).take() for key in keys)


class PerSecond:
    """At most `per_s` events in each second of the monotonic clock."""

    __slots__ = ("left", "per_s", "second")

    def __init__(self, per_s: int) -> None:
        self.per_s = per_s
        self.left = per_s
        self.second = 0

    def allow(self) -> bool:
        second = int(time.monotonic())
        if second != self.second:
            self.second, self.left = second, self.per_s
        if self.left > 0:
            self.left -= 1
            return True
        return False


class LogBudget(PerSecond):
    """At most `per_s` log lines a second about sockets a flood can open at will (refused
    handshakes, refused auths, sockets that leave unauthenticated); past it they are only
    counted, and one warning a second later says how many were left out. The metrics count
    every event. Measured in the bench's guess-flood: two lines per guess made the logging
    thread take the GIL from the event loop 2,000 times a second, and a legit mesh's auth p99
    went from 71 to 121 ms."""

    __slots__ = ("skipped",)

    def __init__(self, per_s: int) -> None:
        super().__init__(per_s)
        self.skipped = 0

    def allow(self) -> bool:
        if super().allow():
            return True
        if not self.skipped:
            asyncio.get_running_loop().call_later(1.0, self._report)
        self.skipped += 1
        return False

    def _report(self) -> None:
        log.warning(
            "%d log lines about refused or unauthenticated sockets left out (over LOG_REFUSALS_PER_S=%d)",
            self.skipped,
            self.per_s,
            extra={"event": "lines_left_out"},
        )
        self.skipped = 0


class Buckets:
    """A histogram as plain counts (upper bounds in seconds); the metrics endpoint reads it."""

    __slots__ = ("bounds", "counts", "sum", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        bucket = bisect.bisect_left(self.bounds, seconds)
        if bucket < len(self.counts):
            self.counts[bucket] += 1
        self.total += 1
        self.sum += seconds


LATENCY_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Stats:
    """What the gateway counts, as plain numbers the hot path bumps (an add each, no lock, no
    library); `METRICS_PORT` serves them in Prometheus' format, read at scrape time."""

    def __init__(self) -> None:
        self.accepted = 0
        self.closed: collections.Counter[int] = collections.Counter()  # by close code
        self.refused: collections.Counter[str] = collections.Counter()  # handshakes, by reason
        self.auth_ok = 0
        self.auth_failed: collections.Counter[str] = collections.Counter()  # by reason
        # By frame class (a plain dict of ints: a Counter's += costs 3x on the relay path, measured).
        self.frames_in: collections.defaultdict[type, int] = collections.defaultdict(int)
        self.frames_out: collections.defaultdict[type, int] = collections.defaultdict(int)
        self.incoming = 0  # gateway_incoming frames sent (counted per fan-out, not per receiver)
        self.errors: collections.Counter[str] = collections.Counter()  # error frames, by code
        self.bytes_in = 0
        self.bytes_out = 0
        self.rate_limited = 0
        self.cut_off = 0
        # HTTP requests a limit refused, by status (408, 413, 429, 507; 431 is the HTTP protocol's count)
        self.http_limited: collections.Counter[int] = collections.Counter()
        self.kept = 0  # offline: frames kept for away meshes (a broadcast once per mesh)
        self.kept_delivered = 0  # offline: kept frames confirmed by their node
        self.publish = Buckets(LATENCY_BOUNDS)  # Redis PUBLISH round trips
        self.queue_wait = Buckets(LATENCY_BOUNDS)  # a frame's wait in its socket's queue, 1 batch in 16
        self.batches = 0


class Socket(Protocol):
    """What `python gateway.py`'s WebSocket protocol (GatewayProtocol) offers the app beyond
    ASGI, as `scope["extensions"][SOCKET_EXTENSION]`. Under a host's own server there is
    none: frames go through ASGI sends, and count as delivered once handed over."""

    @property
    def paused(self) -> bool:
        """The transport holds its high-water mark: write nothing until `when_writable`."""

    def write_texts(self, frames: list[bytes]) -> None:
        """Send these UTF-8 JSON payloads as text frames, in one transport write."""

    def when_writable(self, callback: Callable[[], None]) -> None:
        """Call back once the transport takes writes again (or the connection is gone)."""

    def ping(self, callback: Callable[[], None]) -> bool:
        """Send a ping now and call back when its pong arrives (False: the socket is closing)."""

    def set_on_shutdown(self, callback: Callable[[], None]) -> None:
        """On SIGTERM call this (the app closes with 1012 itself) instead of closing at once."""

    def authenticated(self) -> None:
        """Lift the pre-auth message size limit to WS_MAX_BYTES."""

    def abort(self) -> None:
        """Drop the connection now (a peer that does not read its close)."""

    @property
    def dropped(self) -> bool:
        """It was dropped for sending pings and never reading their pongs."""


class Peer:
    """One WebSocket connection: before auth a stranger, after it one mesh.

    Frames for it wait in `outbox` (encoded JSON, bounded by bytes) until its writer
    hands them to the server; whoever queues a frame never waits for the socket. Under
    `python gateway.py` the writer is a callback at the end of the loop turn that writes
    the whole outbox to the transport at once (no task, no ASGI message per frame);
    under a host's own server it is a task that sends each frame through ASGI. Either
    runs only while there is something to send, so an idle connection costs nothing.

    With offline delivery a handed-over frame stays in `unconfirmed` until the node
    answers a ping sent after it (the node's WebSocket library handles frames in order
    and pongs after them). While the mesh catches up on its mailbox (`live` false), live
    frames wait in `backlog` behind the kept ones. Its events are made by their first waiter,
    and its rate buckets are the mesh's, from the hub: an idle socket holds little.
    """

    __slots__ = (
        "_all_confirmed",
        "_space",
        "appended",
        "auth_deadline",
        "backlog",
        "backlog_bytes",
        "bucket",
        "claimed_ns",
        "closing",
        "confirm_interval",
        "confirm_timer",
        "confirmed",
        "conn",
        "dropping",
        "end",
        "goodbye",
        "greeted",
        "held",
        "ip",
        "kept_seqs",
        "limit",
        "limited",
        "live",
        "mesh_id",
        "name",
        "on_close",
        "on_confirm",
        "outbox",
        "participants",
        "ping_at",
        "public_rooms",
        "queued",
        "queued_at",
        "read_pos",
        "released",
        "send_asgi",
        "sending",
        "sending_at",
        "socket",
        "spills",
        "stats",
        "tracking",
        "unconfirmed",
        "unconfirmed_bytes",
        "updates",
        "writer",
    )  # fmt: skip
    bucket: TokenBucket  # relays and broadcasts: the mesh's own, set by the hub at auth
    updates: TokenBucket  # participant/room updates and discovers: the same

    def __init__(
        self, send: Send, settings: Settings, socket: Socket | None = None, stats: Stats | None = None
    ) -> None:
        self.send_asgi = send
        self.socket = socket  # under `python gateway.py`: the fast write path and the confirmation pings
        self.stats = stats or Stats()
        self.queued_at = 0.0  # when the oldest frame in the outbox was queued
        self.mesh_id: str | None = None
        self.name = ""
        self.conn = os.urandom(8).hex()
        self.claimed_ns = 0  # when it claimed its mesh, set by the hub: the later claim wins
        self.participants: list[Participant] = []
        self.public_rooms: list[str] = []
        self.limited = False  # inside a burst of rate-limited frames
        self.greeted = 0  # participant announcements up to this number were in its greeting
        self.ip = ""  # the client's address
        self.on_close: Callable[[Peer], None] | None = None  # set by the hub that holds this peer
        self.outbox: list[bytes] = []  # a list, swapped out whole by the writer: cheaper than a deque
        self.queued = 0  # bytes queued and not yet handed to the server
        self.limit = max(settings.send_buffer_bytes - TRANSPORT_HIGH_WATER, settings.send_buffer_bytes // 2)
        self.closing = False
        self.goodbye: Close | None = None  # sent once the outbox is empty
        self.dropping = False  # cut off: what is still queued is not sent
        # The writer: a callback handle on the fast path (while paused, the one that ran), or a task.
        self.writer: asyncio.Handle | asyncio.Task[None] | None = None
        self.auth_deadline: asyncio.TimerHandle | None = None
        # Confirmation (offline delivery only): frames are numbered in the order they are queued.
        self.tracking = settings.offline_ttl_s > 0 and socket is not None  # else delivered once handed over
        self.confirm_interval = settings.confirm_interval_s
        self.unconfirmed: list[bytes] = []  # confirmed in runs from the front: `del [:n]`, no deque needed
        self.unconfirmed_bytes = 0
        self.appended = 0  # frames ever queued
        self.confirmed = 0  # frames confirmed (or, not tracking, handed over)
        self.sending: list[bytes] = []  # the ASGI writer's batch, handed over up to `sending_at`
        self.sending_at = 0
        self.ping_at = -1  # frames covered by the confirmation ping in flight (-1: none)
        self.confirm_timer: asyncio.TimerHandle | None = None
        self.kept_seqs: list[tuple[int, int]] = []  # (frame number, mailbox seq) of kept frames sent
        self.on_confirm: Callable[[Peer, int, int], None] | None = (
            None  # (peer, up to seq, how many) kept frames confirmed
        )
        self._all_confirmed: asyncio.Event | None = None  # made by the first waiter
        self._space: asyncio.Event | None = None
        # Catching up (offline delivery only): the hub sets `live` false until the mailbox is read.
        self.live = True
        self.backlog: list[bytes] = []
        self.backlog_bytes = 0
        self.held: dict[str, bytes] = {}  # participant groups (encoded) announced while catching up
        self.read_pos = 0  # mailbox read up to this seq
        self.end = 0  # the mailbox's broadcasts end here (later ones arrive live)
        self.spills = 0  # backlog spills to the mailbox so far
        self.released = False  # its frames went back to the mailbox

    def send(self, data: bytes) -> bool:
        """Queue one frame (encoded JSON); a peer that stops reading is cut off, not waited for."""
        if self.closing:
            return False
        stopped = self.queued > self.limit or self.unconfirmed_bytes > 4 * self.limit  # before this frame:
        if not self.outbox:  # a new batch: its wait is sampled (1 in 16; a clock read per frame costs)
            stats = self.stats
            stats.batches += 1
            self.queued_at = time.monotonic() if stats.batches & 15 == 1 else 0.0
        self.outbox.append(data)  # one big frame (a long discover answer) never cuts off a reader that reads
        self.queued += len(data)
        self.appended += 1
        if stopped:
            self.stats.cut_off += 1
            log.warning("mesh %s: send buffer full, cut off (1013)", self.mesh_id, extra=self.context("cut_off", 1013))
            self.close(CLOSE_TRY_AGAIN, "send buffer full", flush=False)
            return self.released  # this frame too is kept for its return (offline delivery), or lost
        if self.writer is None:
            self._wake()
        return True

    def send_frame(self, frame: Frame) -> bool:
        self.stats.frames_out[frame.__class__] += 1
        if frame.__class__ is Error:
            self.stats.errors[frame.code] += 1
        return self.send(encoder.encode(frame))

    def context(self, event: str, code: int | None = None) -> dict[str, Any]:
        """The `extra` of a log line about this socket (LOG_FORMAT=json shows every field)."""
        return {"event": event, "mesh_id": self.mesh_id, "conn": self.conn, "ip": self.ip, "code": code}

    def deliver(self, data: bytes) -> bool:
        """A live frame for this mesh: sent now, or, while it catches up, after its kept frames."""
        if self.live or self.closing:
            return self.send(data)
        self.backlog.append(data)
        self.backlog_bytes += len(data)
        return True

    def send_kept(self, data: bytes, seq: int) -> None:
        """A frame from the mailbox: confirmed, it moves the mailbox's stored position."""
        self.read_pos = seq  # before `send`: a cut-off there releases this frame with what was sent
        self.kept_seqs.append((self.appended, seq))
        self.send(data)

    def close(self, code: int, reason: str = "", *, flush: bool = True) -> None:
        """Close after what is queued (or, with flush=False, instead of it)."""
        if self.closing:
            return
        self.closing = True
        self.goodbye = Close(code, reason)
        if not flush:
            self.dropping = True
        if self.confirm_timer is not None:
            self.confirm_timer.cancel()
        self._set_all_confirmed()
        self._set_space()
        if self.on_close is not None:
            self.on_close(self)  # the hub takes its unconfirmed frames now (release)
        if not flush:
            self.outbox = []
            self.queued = 0
        self._wake()

    def release(self) -> Requeue:
        """Take every gateway_incoming frame not confirmed yet, in order, for the mailbox."""
        held = [*self.unconfirmed, *self.sending[self.sending_at :], *self.outbox]
        incoming = [data for data in held if data.startswith(INCOMING_PREFIX)]
        requeue = Requeue(held=incoming, read=self.read_pos, end=self.end, backlog=self.backlog)
        self.unconfirmed = []
        self.unconfirmed_bytes = 0
        self.sending, self.sending_at = [], 0
        self.outbox, self.queued = [], 0
        self.backlog, self.backlog_bytes = [], 0
        self.kept_seqs.clear()
        self.dropping = self.released = True
        return requeue

    def go_live(self) -> None:
        """Caught up: what waited behind the kept frames follows them."""
        self.live = True
        backlog, self.backlog, self.backlog_bytes = self.backlog, [], 0
        for data in backlog:
            self.send(data)
        held, self.held = self.held, {}
        for frame in participants_frames(held.values()):
            self.send(frame)

    def presence(self, node: str) -> Presence:
        return Presence(
            mesh_id=self.mesh_id or "",
            name=self.name,
            node=node,
            conn=self.conn,
            claimed_ns=self.claimed_ns,
            public_rooms=self.public_rooms,
            participants=self.participants,
        )

    def has_room(self) -> bool:
        return self.queued + self.unconfirmed_bytes <= self.limit // 2

    async def has_space(self) -> None:
        """Until what the gateway holds for this peer is under half its buffer (or it closes)."""
        while not self.closing and not self.has_room():
            if self._space is None:
                self._space = asyncio.Event()
            self._space.clear()
            self._ask_soon()
            await self._space.wait()

    async def all_confirmed(self) -> None:
        """Until the node has confirmed everything it was sent (or the socket closes)."""
        while self.unconfirmed and not self.closing:
            if self._all_confirmed is None:
                self._all_confirmed = asyncio.Event()
            self._all_confirmed.clear()
            self.ask_confirmation()
            await self._all_confirmed.wait()

    def _set_space(self) -> None:
        if self._space is not None:
            self._space.set()

    def _set_all_confirmed(self) -> None:
        if self._all_confirmed is not None:
            self._all_confirmed.set()

    def _wake(self) -> None:
        if self.writer is not None:
            return
        if self.socket is not None and self.goodbye is None:
            self.writer = asyncio.get_running_loop().call_soon(self._flush)
        else:
            self.writer = asyncio.create_task(self._drain())

    def _flush(self) -> None:
        """The fast path: everything queued goes to the transport in one write, at the end of
        the loop turn that queued it; a paused transport calls back once it drains."""
        socket = self.socket
        assert socket is not None
        if self.outbox and not self.dropping:
            if socket.paused:
                socket.when_writable(self._writable)  # `writer` stays set meanwhile: no one else writes
                return
            batch, batch_bytes, self.outbox, self.queued = self.outbox, self.queued, [], 0
            if self.queued_at:
                self.stats.queue_wait.observe(time.monotonic() - self.queued_at)  # the batch's oldest frame
            socket.write_texts(batch)
            self._handed_over(batch, batch_bytes)
        self.writer = None
        if self.goodbye is not None:
            self._wake()  # the close goes through ASGI, after what was written

    def _writable(self) -> None:
        self.writer = None
        self._wake()

    def _handed_over(self, batch: list[bytes], batch_bytes: int) -> None:
        self.stats.bytes_out += batch_bytes
        if self.tracking:
            self.unconfirmed += batch
            self.unconfirmed_bytes += batch_bytes
            self._ask_soon()
        else:
            self._confirmed(self.confirmed + len(batch))
        if self.queued + self.unconfirmed_bytes <= self.limit // 2:
            self._set_space()

    async def _drain(self) -> None:
        """Send each frame through ASGI until the outbox is empty, then the close if one was
        asked for, and end (under a host's own server; and for every close)."""
        send = self.send_asgi
        try:
            while self.outbox and not self.dropping:
                # Everything queued is in this batch: it stays counted until all of it is handed over.
                batch, batch_bytes, self.outbox = self.outbox, self.queued, []
                self.sending, self.sending_at = batch, 0
                if self.queued_at:
                    self.stats.queue_wait.observe(time.monotonic() - self.queued_at)  # the batch's oldest frame
                for data in batch:
                    if self.dropping:
                        break
                    self.sending_at += 1  # handed over once `send` is called (it may fail after writing)
                    await send({"type": "websocket.send", "text": data.decode()})  # waits while the socket is full
                if self.dropping:
                    break
                self.sending, self.sending_at = [], 0
                self.queued -= batch_bytes
                self._handed_over(batch, batch_bytes)
            if self.goodbye is not None:
                await send({"type": "websocket.close", "code": self.goodbye.code, "reason": self.goodbye.reason})
        except OSError:
            pass  # the client is gone: the reader sees the disconnect and tears the peer down
        finally:
            self.writer = None

    # --- confirmation by the node ---

    def _ask_soon(self) -> None:
        """Ask for a confirmation within CONFIRM_INTERVAL_S (at once when a lot waits)."""
        if not self.unconfirmed or self.ping_at >= 0 or self.closing:
            return
        if self.unconfirmed_bytes > self.limit // 4:
            self.ask_confirmation()
        elif self.confirm_timer is None:
            self.confirm_timer = asyncio.get_running_loop().call_later(self.confirm_interval, self.ask_confirmation)

    def ask_confirmation(self) -> None:
        self.confirm_timer = None
        if self.closing or self.ping_at >= 0 or not self.unconfirmed or self.socket is None:
            return
        upto = self.confirmed + len(self.unconfirmed)
        if self.socket.ping(lambda: self._confirmed(upto)):
            self.ping_at = upto

    def _confirmed(self, upto: int) -> None:
        """The node handled every frame numbered below `upto`."""
        if self.closing:
            return
        if self.unconfirmed:
            done = min(upto - self.confirmed, len(self.unconfirmed))
            if done > 0:
                self.unconfirmed_bytes -= sum(map(len, self.unconfirmed[:done]))
                del self.unconfirmed[:done]
        self.confirmed = max(self.confirmed, upto)
        if self.ping_at == upto:
            self.ping_at = -1
        if self.kept_seqs:
            done = bisect.bisect_left(self.kept_seqs, (upto, -1))  # frame numbers below `upto`
            if done:
                seq = self.kept_seqs[done - 1][1]
                del self.kept_seqs[:done]
                if self.on_confirm is not None:
                    self.stats.kept_delivered += done
                    self.on_confirm(self, seq, done)
        if not self.unconfirmed:
            self._set_all_confirmed()
        else:
            self._ask_soon()
        if self.queued + self.unconfirmed_bytes <= self.limit // 2:
            self._set_space()


class BackplaneUnavailable(Exception):
    """Redis cannot be reached: the caller answers `backplane_unavailable` (or 503)."""


class Presence(Struct, frozen=True, rename="camel"):
    """A connected mesh as every process sees it."""

    mesh_id: str
    name: str
    node: str  # the process that holds the socket
    conn: str  # the connection; a newer one replaces it
    claimed_ns: int  # when the connection claimed the mesh: the later claim wins
    public_rooms: list[str] = []
    participants: list[Participant] = []


class Hub:
    """Every connected mesh: `peers` are the sockets on this process, `online` the
    whole cluster's presences (this process's included). The backplane moves what
    crosses processes; with MemoryBackplane there is only this process.
    `mailboxes` keeps frames for away meshes (None: offline delivery off)."""

    CATCH_UP_ROWS = 256  # kept frames read per database round trip (in memory meanwhile, per returning mesh)

    def __init__(
        self, settings: Settings, backplane: Backplane, mailboxes: Mailboxes | None = None, stats: Stats | None = None
    ) -> None:
        self.settings = settings
        self.stats = stats or Stats()
        self.backplane = backplane
        self.mailboxes = mailboxes if settings.offline_ttl_s > 0 else None
        self.node = backplane.node
        self.peers: dict[str, Peer] = {}
        self.online: dict[str, Presence] = {}  # meshId -> where it is connected, cluster-wide
        self.populated: dict[str, bytes] = {}  # encoded participant groups of the meshes that have some
        self.greeting = Greeting(self.populated)
        self._announcing: dict[str, tuple[int, bytes]] = {}  # (announcement number, group) for this window
        self._announced = 0  # announcements so far
        self._announce_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.buckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}  # per mesh: relays, updates

    @property
    def healthy(self) -> bool:
        return self.backplane.healthy

    def local_presences(self) -> list[Presence]:
        """The presences of the meshes connected to this process (what a backplane announces)."""
        return [self.online[m] for m in self.peers if m in self.online]

    def _put(self, presence: Presence) -> Presence:
        mesh_id = presence.mesh_id
        self.online[mesh_id] = presence
        piece = encoder.encode(group(presence)) if presence.participants else None
        if self.populated.get(mesh_id) != piece:  # (a presence refresh changes nothing here)
            self.greeting.changed(mesh_id)
            if piece is None:
                del self.populated[mesh_id]
            else:
                self.populated[mesh_id] = piece
        return presence

    def _drop(self, mesh_id: str) -> None:
        del self.online[mesh_id]
        self.greeting.changed(mesh_id)
        self.populated.pop(mesh_id, None)

    # --- this process's peers ---

    async def attach(self, peer: Peer, greeting: Frame) -> None:
        """Make `peer` the mesh's one live connection, tell the cluster, greet the peer,
        exchange participant lists, then deliver what was kept for it."""
        mesh_id = peer.mesh_id
        assert mesh_id is not None
        old = self.peers.get(mesh_id)
        before = self.online.get(mesh_id)
        peer.claimed_ns = time.time_ns()
        peer.on_close = self.forget
        peer.on_confirm = self._confirmed
        peer.live = False  # until its greeting (and mailbox) are through
        # Rate limits are per mesh, not per socket: reconnecting never refills them.
        if mesh_id not in self.buckets:
            settings = self.settings
            self.buckets[mesh_id] = TokenBucket(settings.rate_limit_per_min), TokenBucket(settings.update_rate_per_min)
        peer.bucket, peer.updates = self.buckets[mesh_id]
        peer.tracking = peer.tracking and self.mailboxes is not None
        self.peers[mesh_id] = peer
        presence = self._put(peer.presence(self.node))
        requeue = old.release() if old is not None and self.mailboxes is not None else None
        if old is not None:
            log.info("mesh %s: replaced by a newer connection (4000)", mesh_id, extra=old.context("replaced", 4000))
            old.close(CLOSE_REPLACED, "replaced")  # its teardown no longer matches: it changes nothing
        arrival = self.mailboxes.arrive(mesh_id, requeue) if self.mailboxes is not None else None
        peer.send_frame(greeting)  # before any await: no other frame can reach the peer ahead of it
        if presence.participants or (before is not None and before.participants):
            self._announce(presence)  # numbered with its _put: a newcomer's greeting has one or the other
        peer.greeted = self._announced  # the greeting holds every group announced so far
        await self._publish(presence)
        kept = await self._arrived(peer, arrival) if arrival is not None else None
        for frame in self.greeting.frames_for(mesh_id):  # bounded frames, at the socket's pace
            await peer.has_space()
            peer.send(frame)
            self.stats.frames_out[Participants] += 1
        if kept is not None:
            await self._catch_up(peer, inline=True)
        elif not peer.closing:
            peer.go_live()

    async def _arrived(self, peer: Peer, arrival: asyncio.Future[Arrival]) -> Arrival | None:
        """Where the peer's mailbox lies; it hears first how many kept frames were dropped."""
        try:
            kept = await arrival
        except StoreError as exc:  # the mailbox stays stored: it is delivered on a later auth
            log.error("mesh %s: mailbox unreadable (%s): live frames only", peer.mesh_id, exc)
            peer.go_live()
            return None
        if kept.dropped:
            message = f"{kept.dropped} kept frames were dropped (mailbox full or expired)"
            peer.send_frame(Error(message=message, code=MESSAGES_DROPPED, count=kept.dropped))
        peer.read_pos, peer.end = kept.cursor, kept.end
        return kept

    async def _catch_up(self, peer: Peer, *, inline: bool = False) -> None:
        """Deliver the mailbox at the socket's pace, then what waited behind it, then go live.
        `inline` (from the auth handler): a short mailbox is through before the node's next
        frame is read; one that must wait for the socket goes on in its own task."""
        assert self.mailboxes is not None and peer.mesh_id is not None
        while not peer.closing:
            spills = peer.spills
            try:
                rows = await self.mailboxes.read(peer.mesh_id, peer.read_pos, peer.end, self.CATCH_UP_ROWS)
            except StoreError as exc:
                log.error("mesh %s: mailbox read failed (%s): closing so it catches up later", peer.mesh_id, exc)
                peer.close(CLOSE_TRY_AGAIN, "mailbox unavailable", flush=False)
                return
            for seq, frame in rows:
                if peer.closing:
                    return  # released: what was not read is still stored
                if inline and not peer.has_room():
                    self._spawn(self._catch_up(peer))
                    return
                await peer.has_space()
                peer.send_kept(frame, seq)
            if len(rows) < self.CATCH_UP_ROWS and peer.spills == spills:
                break
            if inline:
                self._spawn(self._catch_up(peer))
                return
        if peer.closing:
            return
        peer.go_live()
        if not peer.kept_seqs:
            self._spawn(self.mailboxes.confirm(peer.mesh_id, peer.read_pos, caught_up=True))

    def _confirmed(self, peer: Peer, seq: int, count: int) -> None:
        if self.mailboxes is not None and peer.mesh_id is not None:
            caught_up = peer.live and not peer.kept_seqs
            self._spawn(self.mailboxes.confirm(peer.mesh_id, seq, count=count, caught_up=caught_up))

    def _spill(self, peer: Peer) -> None:
        """A long catch-up: what waits behind it goes to the mailbox instead of memory,
        unless the socket itself stopped reading (then it is cut off, as any full buffer)."""
        if peer.mesh_id is None or peer.backlog_bytes <= peer.limit // 2:
            return
        if self.mailboxes is None or not peer.has_room():
            log.warning(
                "mesh %s: send buffer full while catching up, cut off (1013)",
                peer.mesh_id,
                extra=peer.context("cut_off", 1013),
            )
            peer.close(CLOSE_TRY_AGAIN, "send buffer full", flush=False)
            return
        frames, peer.backlog, peer.backlog_bytes = peer.backlog, [], 0
        peer.spills += 1
        self._spawn(self.mailboxes.spill(peer.mesh_id, frames))

    def forget(self, peer: Peer) -> None:
        """Drop `peer` unless a newer connection already replaced it; no ghost participants
        remain, and what it had not confirmed is kept for its return."""
        if peer.mesh_id is None or self.peers.get(peer.mesh_id) is not peer:
            return
        del self.peers[peer.mesh_id]
        if self.mailboxes is not None:
            self._spawn(self.mailboxes.leave(peer.mesh_id, peer.release()))
        presence = self.online.get(peer.mesh_id)
        if presence is not None and presence.conn == peer.conn:  # else another process took the mesh over
            self._drop(peer.mesh_id)
            if presence.participants:
                self._announce(msgspec.structs.replace(presence, participants=[]))
        self._spawn(self._withdraw(peer.presence(self.node)))  # our own entry in Redis goes either way

    def drain_soon(self, peer: Peer) -> None:
        self._spawn(self.drain(peer))

    async def drain(self, peer: Peer) -> None:
        """Shutdown: have the node confirm what it was sent (up to 2 s), keep the rest, then 1012."""
        peer.dropping = True  # send nothing more: it is kept instead
        if peer.unconfirmed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await peer.all_confirmed()
        if self.mailboxes is not None and peer.mesh_id is not None and self.peers.get(peer.mesh_id) is peer:
            del self.peers[peer.mesh_id]
            with contextlib.suppress(StoreError):
                await self.mailboxes.leave(peer.mesh_id, peer.release())
            self.peers.setdefault(peer.mesh_id, peer)  # forget() still withdraws its presence
        peer.close(CLOSE_RESTART, "service restart", flush=False)

    async def set_participants(self, peer: Peer, participants: list[Participant]) -> None:
        peer.participants = participants
        presence = self._put(peer.presence(self.node))
        self._announce(presence)
        await self._publish(presence)

    async def set_rooms(self, peer: Peer, rooms: list[str]) -> None:
        peer.public_rooms = rooms
        presence = self._put(peer.presence(self.node))
        await self._publish(presence)

    async def _publish(self, presence: Presence) -> None:
        try:
            await self.backplane.publish(presence)
        except BackplaneUnavailable:
            log.warning("mesh %s: backplane down, announced on this process only", presence.mesh_id)

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        """Run a background update without holding up the caller (kept until done; failures logged)."""
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if isinstance(error, StoreError):
            log.error("database write failed: %s", error)
        elif error is not None:  # a bug: never silent
            log.error("background task failed", exc_info=error)

    async def _withdraw(self, presence: Presence) -> None:
        try:
            await self.backplane.withdraw(presence)
        except BackplaneUnavailable:
            log.warning("mesh %s: backplane down, its presence expires by TTL", presence.mesh_id)

    async def refresh_forever(self) -> None:
        """Housekeeping: forget full rate-limit buckets of meshes that are gone; offline delivery's
        last-seen times, TTL expiry, unreferenced frames."""
        while True:
            await asyncio.sleep(self.mailboxes.refresh_s if self.mailboxes is not None else 10.0)
            for mesh_id in [
                m
                for m, (relays, updates) in self.buckets.items()
                if m not in self.peers and relays.full() and updates.full()
            ]:
                del self.buckets[mesh_id]
            if self.mailboxes is not None:
                with contextlib.suppress(StoreError, BackplaneUnavailable):
                    await self.mailboxes.refresh([m for m, peer in self.peers.items() if peer.live])

    # --- relaying ---

    def encode_incoming(self, sender: Peer, payload: Any) -> bytes:
        payload = federate(payload)
        return encoder.encode(Incoming(from_mesh_id=sender.mesh_id or "", from_mesh_name=sender.name, payload=payload))

    def relay(self, sender: Peer, target: str, payload: Any, frame_id: str | None) -> None:
        """Deliver to one mesh, here or on its process, or keep it if the mesh is away; answer
        the sender: an ack (if it gave an id) or an error. Across processes the answer comes
        when Redis confirms, so the sender's next frames are read meanwhile."""
        data = self.encode_incoming(sender, payload)
        peer = self.peers.get(target)
        if peer is not None and self.deliver(target, data):
            answer_relay(sender, target, frame_id, 1)
        elif not self.healthy:
            sender.send_frame(unavailable(frame_id))
        elif peer is None and (presence := self.online.get(target)) is not None:
            published = self.backplane.relay(presence.node, target, data)
            published.add_done_callback(lambda done: self._relayed(sender, target, data, frame_id, receivers(done)))
        else:
            self._keep(sender, target, data, frame_id)

    def _relayed(self, sender: Peer, target: str, data: bytes, frame_id: str | None, delivered: int | None) -> None:
        if delivered == 0:  # published to a process that is gone: kept, not lost
            self._keep(sender, target, data, frame_id)
        else:
            answer_relay(sender, target, frame_id, delivered)

    def _keep(self, sender: Peer, target: str, data: bytes, frame_id: str | None) -> None:
        if self.mailboxes is None:
            answer_relay(sender, target, frame_id, 0)
            return
        kept = self.mailboxes.keep(sender.mesh_id or "", target, data)
        kept.add_done_callback(self._count_kept)
        kept.add_done_callback(lambda done: answer_relay(sender, target, frame_id, 0, queued=stored(done)))

    def broadcast(self, sender: Peer, payload: Any, frame_id: str | None) -> None:
        """Encode once; deliver here, publish once for the other processes, keep once for
        every away mesh. The ack counts the meshes connected cluster-wide, less the sender."""
        data = self.encode_incoming(sender, payload)
        mesh_id = sender.mesh_id or ""
        self.fan_out(mesh_id, data)
        delivered = len(self.online) - 1
        if not self.healthy:  # delivered on this process only
            sender.send_frame(unavailable(frame_id))
            return
        published = self.backplane.broadcast(mesh_id, data)
        readers = self.mailboxes.readers if self.mailboxes is not None else ()
        if not readers or (len(readers) == 1 and mesh_id in readers):  # nobody away: the common, cheap case
            published.add_done_callback(lambda done: answer_broadcast(sender, frame_id, delivered, [outcome(done)]))
            return
        kept = self.mailboxes.keep(mesh_id, None, data)  # type: ignore[union-attr]
        kept.add_done_callback(self._count_kept)
        both = asyncio.gather(published, kept, return_exceptions=True)
        both.add_done_callback(lambda done: answer_broadcast(sender, frame_id, delivered, done.result()))

    def _count_kept(self, kept: asyncio.Future[int]) -> None:
        self.stats.kept += stored(kept) or 0

    def deliver(self, mesh_id: str, data: bytes) -> bool:
        """A live frame for a mesh on this process (False: not here, or closing)."""
        peer = self.peers.get(mesh_id)
        if peer is None or not peer.deliver(data):
            return False
        self.stats.incoming += 1
        if peer.backlog_bytes > peer.limit // 2:
            self._spill(peer)
        return True

    def fan_out(self, sender: str, data: bytes) -> None:
        receivers = 0
        for peer in list(self.peers.values()):
            if peer.mesh_id != sender and peer.deliver(data):
                receivers += 1
                if peer.backlog_bytes > peer.limit // 2:
                    self._spill(peer)
        self.stats.incoming += receivers

    def instances(self) -> list[Instance]:
        """Every connected mesh; only this process's while the backplane is down."""
        meshes = self.online.values() if self.healthy else (p.presence(self.node) for p in self.peers.values())
        return [Instance(mesh_id=p.mesh_id, name=p.name, public_rooms=p.public_rooms) for p in meshes]

    # --- what other processes tell us ---

    def apply(self, presence: Presence) -> None:
        """Another process holds (or updated) a mesh."""
        if presence.node == self.node:
            return
        mesh_id = presence.mesh_id
        local = self.peers.get(mesh_id)
        if local is not None and local.claimed_ns > presence.claimed_ns:
            return  # ours is the newer claim: the other process yields
        before = self.online.get(mesh_id)
        self._put(presence)
        if local is not None:
            local.close(CLOSE_REPLACED, "replaced")
        if before == presence:
            return
        reconnected = before is None or before.conn != presence.conn
        if presence.participants != (before.participants if before is not None else []) or (
            reconnected and presence.participants
        ):
            self._announce(presence)

    def remove(self, mesh_id: str, conn: str) -> None:
        """A remote connection ended (or its process's presence expired)."""
        presence = self.online.get(mesh_id)
        if presence is None or presence.conn != conn or presence.node == self.node:
            return
        self._drop(mesh_id)
        if presence.participants:
            self._announce(msgspec.structs.replace(presence, participants=[]))
        if self.mailboxes is not None:
            self._spawn(self.mailboxes.lost(mesh_id))  # its process may be gone: away from now on

    def resync(self, remote: dict[str, Presence]) -> None:
        """Make the view of other processes' meshes equal to `remote` (read from Redis)."""
        for mesh_id, presence in list(self.online.items()):
            if presence.node != self.node and mesh_id not in remote:
                self.remove(mesh_id, presence.conn)
        for presence in remote.values():
            self.apply(presence)

    def changed(self, mesh_id: str, *, name: str | None = None, close: bool = False) -> None:
        """The registry changed a mesh: rename it, or close it (unregistered), if it is here."""
        peer = self.peers.get(mesh_id)
        if peer is None:
            return
        if close:
            peer.close(CLOSE_UNREGISTERED, "unregistered")
        elif name is not None:
            peer.name = name
            self._spawn(self._publish(self._put(peer.presence(self.node))))

    def _announce(self, presence: Presence) -> None:
        """Send a mesh's participant group to every other mesh on this process, coalesced: what
        is announced within ANNOUNCE_S reaches each receiver as one frame with the latest groups."""
        self._announced += 1
        self._announcing[presence.mesh_id] = (self._announced, encoder.encode(group(presence)))
        if self._announce_timer is None:
            self._announce_timer = asyncio.get_running_loop().call_later(ANNOUNCE_S, self._flush_announcements)

    def _flush_announcements(self) -> None:
        self._announce_timer = None
        announcing, self._announcing = self._announcing, {}
        first = min(number for number, _ in announcing.values())
        shared = list(participants_frames(piece for _, piece in announcing.values()))
        for peer in list(self.peers.values()):
            if peer.mesh_id not in announcing and peer.greeted < first:
                news: Iterable[bytes] = shared  # encoded once for every such receiver
            else:  # not its own group, nor what its greeting already held
                news = [p for m, (n, p) in announcing.items() if m != peer.mesh_id and n > peer.greeted]
            if not peer.live:  # greeting or catching up: the latest groups follow once it is through
                peer.held.update((m, p) for m, (n, p) in announcing.items() if m != peer.mesh_id and n > peer.greeted)
                continue
            for frame in news if news is shared else participants_frames(news):
                peer.send(frame)
                self.stats.frames_out[Participants] += 1

    async def close_all(self, code: int, reason: str) -> None:
        """Close every socket, wait (briefly) for the closes and the cluster to hear of them."""
        peers = list(self.peers.values())
        for peer in peers:
            peer.close(code, reason)
        pending = [peer.writer for peer in peers if isinstance(peer.writer, asyncio.Task)] + list(self._tasks)
        if pending:
            await asyncio.wait(pending, timeout=2)


def receivers(published: asyncio.Future[int]) -> int | None:
    """How many processes took a published frame; None if Redis failed."""
    if published.cancelled() or published.exception() is not None:
        return None
    return published.result()


def outcome(done: asyncio.Future[Any]) -> Any:
    """A done future's result, or its exception (as `gather(..., return_exceptions=True)` gives)."""
    if done.cancelled():
        return asyncio.CancelledError()
    return done.exception() or done.result()


def stored(kept: asyncio.Future[int]) -> int | None:
    """For how many away meshes a frame was kept; None if it could not be stored."""
    if kept.cancelled() or kept.exception() is not None:
        return None
    return kept.result()


def answer_broadcast(sender: Peer, frame_id: str | None, delivered: int, results: Sequence[Any]) -> None:
    """A failed publish or store is always answered (nothing dropped silently); a done one is acked if it had an id."""
    if any(isinstance(result, BaseException) for result in results):
        sender.send_frame(unavailable(frame_id))
    elif frame_id is not None:
        queued = results[1] if len(results) > 1 else 0
        sender.send_frame(Ack(id=frame_id, delivered=delivered, queued=queued))


def answer_relay(
    sender: Peer, target: str, frame_id: str | None, delivered: int | None, *, queued: int | None = 0
) -> None:
    if delivered is None or queued is None:
        sender.send_frame(unavailable(frame_id))
    elif not delivered and not queued:
        message = f"mesh {target!r} is not connected"
        sender.send_frame(Error(message=message, code=TARGET_OFFLINE, id=frame_id, target_mesh_id=target))
    elif frame_id is not None:
        sender.send_frame(Ack(id=frame_id, delivered=delivered, queued=queued))


# Participant announcements within this window are coalesced (a reconnect storm of 2,000 meshes
# would otherwise send 2 million single-group frames); each frame holds groups up to FRAME_GROUPS_BYTES.
ANNOUNCE_S = 0.1  # 20 ms made 50 flushes/s, each a frame (and a writer task) per receiver: 3.2x slower storms
FRAME_GROUPS_BYTES = 64 * 1024
PARTICIPANTS_HEAD = b'{"type":"gateway_participants","remoteParticipants":['


def participants_frames(groups: Iterable[bytes]) -> Iterator[bytes]:
    """Encoded participant groups packed into gateway_participants frames of bounded size (the node
    replaces each mesh's group as it comes, so splitting is compatible)."""
    return (frame for frame, _ in packed_groups(groups))


def packed_groups(groups: Iterable[bytes]) -> Iterator[tuple[bytes, int]]:
    """The frames of `participants_frames`, each with how many groups it holds. Every frame but
    the last is full: the next group would not have fit."""
    batch: list[bytes] = []
    size = 0
    for piece in groups:
        if batch and size + len(piece) > FRAME_GROUPS_BYTES:
            yield PARTICIPANTS_HEAD + b",".join(batch) + b"]}", len(batch)
            batch, size = [], 0
        batch.append(piece)
        size += len(piece) + 1
    if batch:
        yield PARTICIPANTS_HEAD + b",".join(batch) + b"]}", len(batch)


class Greeting:
    """The participant groups a newcomer is greeted with: every group of `populated` (meshId ->
    encoded group, in the order they came) but its own, in bounded frames. The full frames are
    kept for the next newcomer, so a reconnect storm packs each group once instead of once per
    later newcomer (py-spy, 2,000-mesh storm with participants: packing was ~15 % of the loop);
    only the frame holding the newcomer's own group, and the last one, are packed for it.
    A group that changes or goes drops the kept frames; new groups come last, so they never do.
    The kept frames are one more copy of the groups' bytes."""

    def __init__(self, populated: dict[str, bytes]) -> None:
        self.populated = populated
        self.frames: list[bytes] = []  # full frames of the first `count` groups of `populated`
        self.starts: list[int] = []  # where each of them starts in `populated`
        self.count = 0
        self.where: dict[str, int] = {}  # meshId -> the kept frame that holds its group

    def changed(self, mesh_id: str) -> None:
        if mesh_id in self.where:
            self.frames, self.starts, self.count, self.where = [], [], 0, {}

    def frames_for(self, newcomer: str) -> list[bytes]:
        rest = list(itertools.islice(self.populated.items(), self.count, None))
        taken = 0
        for frame, groups in list(packed_groups(piece for _, piece in rest))[:-1]:  # full: kept
            self.where.update((mesh_id, len(self.frames)) for mesh_id, _ in rest[taken : taken + groups])
            self.frames.append(frame)
            self.starts.append(self.count + taken)
            taken += groups
        self.count += taken
        tail = list(participants_frames(piece for m, piece in rest[taken:] if m != newcomer))
        if (own := self.where.get(newcomer)) is None:
            return [*self.frames, *tail]
        end = self.starts[own + 1] if own + 1 < len(self.starts) else self.count
        others = (p for m, p in itertools.islice(self.populated.items(), self.starts[own], end) if m != newcomer)
        return [*self.frames[:own], *participants_frames(others), *self.frames[own + 1 :], *tail]


def group(presence: Presence) -> ParticipantGroup:
    return ParticipantGroup(mesh_id=presence.mesh_id, mesh_name=presence.name, participants=presence.participants)


# --- Backplane --------------------------------------------------------------
# Moves what crosses processes. MemoryBackplane: one process, nothing to move.
# RedisBackplane: presence in Redis hashes with a TTL, frames over pub/sub.


class Backplane(Protocol):
    """What crosses processes. The hub calls these; the backplane calls back only the hub's
    `deliver`, `fan_out`, `apply`, `remove`, `changed`, `resync` and `local_presences`."""

    node: str
    """This process's id: where a presence says its mesh is connected."""

    @property
    def healthy(self) -> bool:
        """False while the other processes cannot be reached: /health answers 503."""
        ...

    async def start(self, hub: Hub) -> None:
        """Start moving frames for `hub`; return once healthy (or after a bounded wait)."""

    async def stop(self) -> None:
        """Stop, and withdraw this process from the cluster."""

    async def publish(self, presence: Presence) -> None:
        """Tell every process that a mesh is connected here (its participants and rooms too)."""

    async def withdraw(self, presence: Presence) -> None:
        """Tell every process this connection of the mesh ended (a newer one stays)."""

    def relay(self, node: str, mesh_id: str, frame: bytes) -> asyncio.Future[int]:
        """Send an encoded frame to a mesh on process `node`: the future holds how many
        processes took it (0: the mesh is not there) or fails with BackplaneUnavailable."""
        ...

    def broadcast(self, sender: str, frame: bytes) -> asyncio.Future[int]:
        """Send an encoded frame to every other process's meshes but `sender`; as `relay`."""
        ...

    async def notify(self, mesh_id: str, *, name: str | None = None, close: bool = False) -> None:
        """A registration changed: rename the mesh's live socket, or close it (deleted)."""


class MemoryBackplane:
    """The single-process default: every mesh is on this process."""

    def __init__(self) -> None:
        self.node = "local"
        self.healthy = True
        self.hub: Hub | None = None

    async def start(self, hub: Hub) -> None:
        self.hub = hub

    async def stop(self) -> None:
        self.hub = None

    async def publish(self, presence: Presence) -> None:
        pass

    async def withdraw(self, presence: Presence) -> None:
        pass

    def relay(self, node: str, mesh_id: str, frame: bytes) -> asyncio.Future[int]:
        return self._done(0)  # no other process: a mesh not held here is offline

    def broadcast(self, sender: str, frame: bytes) -> asyncio.Future[int]:
        return self._done(0)

    def _done(self, receivers: int) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        future.set_result(receivers)
        return future

    async def notify(self, mesh_id: str, *, name: str | None = None, close: bool = False) -> None:
        if self.hub is not None:
            self.hub.changed(mesh_id, name=name, close=close)


# --- Dispatcher -------------------------------------------------------------


async def dispatch(peer: Peer, frame: ClientFrame, hub: Hub) -> None:
    """Handle one decoded frame from an authenticated peer."""
    match frame:
        case Discover():
            if admit(peer, None, peer.updates):
                peer.send_frame(DiscoverResult(instances=hub.instances()))
        case Relay(target_mesh_id=target, payload=payload, id=frame_id):
            if admit(peer, frame_id, peer.bucket):
                hub.relay(peer, target, payload, frame_id)
        case Broadcast(payload=payload, id=frame_id):
            if admit(peer, frame_id, peer.bucket):
                hub.broadcast(peer, payload, frame_id)
        case UpdateParticipants(participants=participants):
            if admit(peer, None, peer.updates):
                await hub.set_participants(peer, participants)
        case UpdateRooms(public_rooms=rooms):
            if admit(peer, None, peer.updates):
                await hub.set_rooms(peer, rooms)
        case Auth(id=frame_id):
            peer.send_frame(Error(message="already authenticated", code=ALREADY_AUTHENTICATED, id=frame_id))


def unavailable(frame_id: str | None) -> Error:
    """Redis (or, for a frame kept for an away mesh, the database) could not take the frame."""
    return Error(message="backplane unavailable: not relayed or kept, retry", code=BACKPLANE_UNAVAILABLE, id=frame_id)


def admit(peer: Peer, frame_id: str | None, bucket: TokenBucket) -> bool:
    """Rate limit a frame that fans out or answers with a list: over the limit it is answered, never
    acted on. The first refusal of a burst is logged, not every frame."""
    wait_ms = bucket.take()
    if not wait_ms:
        peer.limited = False
        return True
    peer.stats.rate_limited += 1
    if not peer.limited:
        peer.limited = True
        log.warning(
            "mesh %s: rate limited (retry after %d ms)", peer.mesh_id, wait_ms, extra=peer.context("rate_limited")
        )
    peer.send_frame(Error(message="rate limit exceeded", code=RATE_LIMITED, id=frame_id, retry_after_ms=wait_ms))
    return False


# --- Endpoints: request bodies and HTTP errors --------------------------------

# The whole id must match: `\Z`, not `$` (which also matches before a trailing newline).
MeshIdField = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}\Z")]
SecretField = Annotated[str, Meta(min_length=8, max_length=512)]
NameField = Annotated[str, Meta(min_length=1, max_length=100)]
MAX_BODY_BYTES = 16 * 1024


class RegisterBody(Struct, rename="camel"):
    mesh_id: MeshIdField
    secret: SecretField
    name: NameField
    new_secret: SecretField | None = None


class UnregisterBody(Struct, rename="camel"):
    mesh_id: MeshIdField
    secret: SecretField | None = None


class Reject(Exception):
    """An HTTP error answer: status and a message for the JSON body."""

    def __init__(self, status: int, message: str, *, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_ms = retry_after_ms  # 429: sent as Retry-After (seconds)


LIMIT_STATUSES = frozenset({408, 413, 429})  # Reject statuses that are a limit (counted in the metrics)


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(encoder.encode(content), status_code=status, media_type="application/json", headers=headers)


def client_ip(scope: Mapping[str, Any]) -> str:
    """The peer's address; uvicorn has already put X-Forwarded-For's there when the peer is in
    FORWARDED_ALLOW_IPS (its own proxy-headers handling)."""
    client = scope.get("client")
    return client[0] if client else "unknown"


async def read_json(request: Request, kind: type[Struct], *, timeout: float) -> Any:
    """The body, decoded into `kind`; 413 past 16 KiB whether declared or streamed, 408 if it
    takes longer than `timeout` to arrive."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise Reject(413, "body larger than 16 KiB")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise Reject(413, "body larger than 16 KiB")
    except TimeoutError:
        raise Reject(408, f"request body not received within {timeout:g} s") from None
    try:
        value = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise Reject(400, str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise Reject(400, f"invalid JSON: {exc}") from None
    if isinstance(value, RegisterBody | UnregisterBody) and value.mesh_id in (".", ".."):
        raise Reject(400, "meshId must not be `.` or `..` - at `$.meshId`")
    if isinstance(value, RegisterBody) and not value.name.isprintable():
        raise Reject(400, "name must be printable - at `$.name`")
    if isinstance(value, RegisterBody) and not is_visible(value.name):
        raise Reject(400, "name needs at least one visible character - at `$.name`")
    return value


# Letters, digits, punctuation and symbols that render as nothing (fillers, blank patterns).
BLANK_LOOKING = frozenset("\u115f\u1160\u3164\uffa0\u2800\u17b4\u17b5\u180e")


def is_visible(name: str) -> bool:
    """At least one character that shows: a letter, digit, punctuation mark or symbol that is not
    blank-looking. Spaces, format and control characters and combining marks alone do not count."""
    return any(unicodedata.category(c)[0] in "LNPS" and c not in BLANK_LOOKING for c in name)


# --- Endpoints and assembly: the Gateway (routes, lifespan), create_app, main -


class AsgiEndpoint:
    """Makes Starlette route to `endpoint` as a plain ASGI app (it wraps functions and methods)."""

    __slots__ = ("endpoint",)

    def __init__(self, endpoint: Callable[[dict[str, Any], Receive, Send], Awaitable[None]]) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await self.endpoint(scope, receive, send)


async def refuse(scope: Mapping[str, Any], send: Send, status: int) -> None:
    """Refuse a WebSocket handshake with an HTTP status (a plain 403 close where the server
    lacks ASGI's websocket.http.response extension)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1013})
        return
    body = encoder.encode({"error": "too many connections, retry later"})
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"5")]
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


def serve_metrics(gateway: Gateway, registry: Registry, host: str, port: int) -> Callable[[], None]:
    """Prometheus metrics on their own listener (never on the public port); returns its stop."""
    from prometheus_client import CollectorRegistry, start_http_server

    metrics = CollectorRegistry(auto_describe=True)
    metrics.register(GatewayCollector(gateway, registry))
    server, thread = start_http_server(port, addr=host, registry=metrics)
    log.info("metrics on http://%s:%d/metrics", host, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)

    return stop


class GatewayCollector:
    """Reads Stats (and the hub) at scrape time: the relay path only ever adds to plain numbers.
    Runs in the metrics server's thread; it reads numbers the event loop writes (a scrape may be
    a frame behind, never torn)."""

    def __init__(self, gateway: Gateway, registry: Registry) -> None:
        self.gateway = gateway
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats, hub = self.gateway.stats, self.gateway._hub
        prefix = "mesh_gateway_"

        def counter(name: str, doc: str, value: float | collections.Counter[Any] | None = None, label: str = "") -> Any:
            family = CounterMetricFamily(prefix + name, doc, labels=[label] if label else None)
            for key, count in sorted(value.items()) if isinstance(value, collections.Counter) else [("", value)]:
                family.add_metric([str(key)] if label else [], count or 0)
            return family

        def gauge(name: str, doc: str, value: float) -> Any:
            return GaugeMetricFamily(prefix + name, doc, value=value)

        yield gauge("connections_open", "WebSockets open now", self.gateway.sockets)
        yield counter("connections_accepted", "WebSockets accepted", stats.accepted)
        yield counter("connections_closed", "WebSockets closed, by close code", stats.closed, "code")
        yield counter("connections_refused", "WebSocket handshakes refused (503), by reason", stats.refused, "reason")
        yield counter("auth_ok", "successful authentications", stats.auth_ok)
        yield counter("auth_failed", "refused authentications, by reason", stats.auth_failed, "reason")
        received = collections.Counter({wire_type(cls, "invalid"): n for cls, n in list(stats.frames_in.items())})
        sent = collections.Counter({wire_type(cls, "error"): n for cls, n in list(stats.frames_out.items())})
        sent["gateway_incoming"] += stats.incoming
        yield counter("frames_in", "frames received, by type (invalid: undecodable)", received, "type")
        yield counter("frames_out", "frames sent, by type", sent, "type")
        yield counter("errors", "error frames sent, by code", stats.errors, "code")
        yield counter("bytes_in", "message bytes received", stats.bytes_in)
        yield counter("bytes_out", "message bytes handed to the server", stats.bytes_out)
        yield counter("rate_limited", "frames refused by a rate limit", stats.rate_limited)
        yield counter("cut_offs", "sockets cut off (1013) for not reading", stats.cut_off)
        limited = stats.http_limited + collections.Counter({431: getattr(http_protocol(), "refused", 0)})
        yield counter("http_limited", "HTTP requests refused by a limit, by status", limited, "status")
        yield gauge("meshes_connected", "meshes connected to this process", len(hub.peers) if hub else 0)
        registered = getattr(self.registry, "registered", None)
        if registered is not None:
            yield gauge("meshes_registered", "meshes registered", registered)
        if hub is not None and hub.mailboxes is not None:
            yield gauge("meshes_away", "meshes away (frames are kept for them)", len(hub.mailboxes.readers))
            yield gauge("offline_queued", "frames kept for away meshes now", hub.mailboxes.queued)
            yield counter("offline_kept", "frames kept for away meshes (once per mesh)", stats.kept)
            yield counter("offline_delivered", "kept frames confirmed by their node", stats.kept_delivered)
            yield counter("offline_dropped", "kept frames dropped past the bounds", hub.mailboxes.dropped)
            yield counter("offline_expired", "kept frames expired (OFFLINE_TTL_S)", hub.mailboxes.expired)
        yield gauge("backplane_up", "1 if this process can serve (its Redis answers)", 1 if hub and hub.healthy else 0)
        yield histogram(prefix + "redis_publish_seconds", "Redis PUBLISH round trips", stats.publish)
        yield histogram(prefix + "queue_wait_seconds", "how long a frame waits in its socket's queue", stats.queue_wait)


def wire_type(cls: type, error: str) -> str:
    """A frame class's wire tag (`error` names Error: `invalid` for frames that failed to decode)."""
    return error if cls is Error else str(cls.__struct_config__.tag)  # type: ignore[attr-defined]


def histogram(name: str, doc: str, buckets: Buckets) -> Any:
    from prometheus_client.core import HistogramMetricFamily

    cumulative, running = [], 0
    for bound, count in zip(buckets.bounds, buckets.counts, strict=True):
        running += count
        cumulative.append((str(bound), running))
    cumulative.append(("+Inf", buckets.total))
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=buckets.sum)


def startup_summary(settings: Settings, where: str, offline: str, backplane_up: bool) -> str:
    """One line at warning level (never silenced by LOG_LEVEL) saying how this gateway runs."""
    loopback = settings.host in ("127.0.0.1", "::1", "localhost")
    if settings.gateway_admin_token:
        registration = "registration closed (admin token)"
    elif loopback:
        registration = "registration open"
    else:
        registration = "registration OPEN to anyone who can reach it (set GATEWAY_ADMIN_TOKEN to close it)"
    redis = "no Redis" if not settings.redis_url else "Redis answered" if backplane_up else "Redis NOT answering"
    return (
        f"mesh-gateway {VERSION} ready on http://{settings.host}:{settings.port}: {registration}; payload policy "
        f"{settings.payload_policy}; state in {where}; {offline}; {redis}"
    )


class Gateway:
    """The gateway's routes and lifespan, for `create_app` or a host app to mount."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.decoder = FRAME_DECODERS[self.settings.payload_policy]
        self.routes: list[BaseRoute] = [
            Route("/register", self.register, methods=["GET", "POST", "DELETE"]),
            Route("/health", self.health, methods=["GET"]),
            WebSocketRoute("/gateway", AsgiEndpoint(self.gateway_ws)),
        ]
        self._hub: Hub | None = None
        self._registry: Registry | None = None
        self._hasher: Hasher | None = None
        self.failures = Throttle(self.settings.auth_failures_per_min)  # failed auths, per meshId and per IP
        self.refusals = LogBudget(self.settings.log_refusals_per_s)  # lines about sockets anyone can open
        self.registrations = Throttle(self.settings.register_per_min)  # registrations, per IP
        self.draining = False  # SIGTERM came: /health answers 503 so load balancers move on
        self.stats = Stats()
        self.sockets = 0  # WebSockets open (MAX_CONNECTIONS)
        self.pending = 0  # of which not yet authenticated (MAX_PENDING_AUTH)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Open the store, backplane and hub; on exit close every socket (1012) and persist."""
        settings = self.settings
        async with contextlib.AsyncExitStack() as stack:
            hasher = Hasher()
            stack.push_async_callback(hasher.close)
            await hasher.start()
            backplane: Backplane
            registry: Registry
            mailboxes: Mailboxes | None
            if settings.redis_url:
                from gateway_redis import redis_parts  # the cluster mode, with its redis import

                backplane, registry, mailboxes = redis_parts(settings)
                where = "Redis"
            else:
                store = SqliteStore(settings)
                stack.push_async_callback(store.close)
                await store.start()
                await store.import_file(settings.registry_path)
                backplane, registry, mailboxes = MemoryBackplane(), store, store
                where = settings.db_path
            hub = Hub(settings, backplane, mailboxes, self.stats)
            stack.push_async_callback(backplane.stop)
            await backplane.start(hub)
            refresher = asyncio.create_task(hub.refresh_forever())
            stack.callback(refresher.cancel)
            if settings.metrics_port is not None:
                stack.callback(serve_metrics(self, registry, settings.host, settings.metrics_port))
            self._hub, self._registry, self._hasher = hub, registry, hasher
            stack.callback(self._stopped)
            stack.push_async_callback(hub.close_all, CLOSE_RESTART, "service restart")
            offline = f"offline delivery {settings.offline_ttl_s:g} s" if hub.mailboxes else "offline delivery off"
            log.warning(startup_summary(settings, where, offline, backplane.healthy), extra={"event": "ready"})
            yield

    def _stopped(self) -> None:
        self._hub = self._registry = self._hasher = None
        log.info("gateway stopped")

    @property
    def hub(self) -> Hub:
        if self._hub is None:
            raise RuntimeError("the gateway's lifespan is not running: enter Gateway.lifespan from the host app")
        return self._hub

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise RuntimeError("the gateway's lifespan is not running: enter Gateway.lifespan from the host app")
        return self._registry

    async def _hash(self, secret: str) -> str:
        assert self._hasher is not None
        return await self._hasher.hash(secret)

    async def _verify(self, secret: str, secret_hash: str, *, urgent: bool = False) -> bool:
        assert self._hasher is not None
        return await self._hasher.verify(secret, secret_hash, urgent=urgent)

    async def _check(self, mesh_id: str, ip: str, secret: str, secret_hash: str) -> bool:
        """A secret check on /register: wrong secrets count against the mesh and the IP, and while
        either is throttled the secret is not checked at all (429)."""
        keys = (f"mesh:{mesh_id}", f"ip:{ip}")
        if wait_ms := self.failures.wait_ms(*keys):
            raise Reject(429, "Too many attempts", retry_after_ms=wait_ms)
        if await self._verify(secret, secret_hash):
            return True
        self.failures.take(*keys)
        return False

    def _is_admin(self, request: Request) -> bool:
        token = self.settings.gateway_admin_token
        offered = request.headers.get("authorization", "")
        return token is not None and hmac.compare_digest(offered.encode(), f"Bearer {token}".encode())

    # --- Endpoints: HTTP ---

    async def register(self, request: Request) -> Response:
        try:
            if not self.hub.healthy:
                raise BackplaneUnavailable
            if request.method == "DELETE":
                return await self._unregister(request)
            if request.method == "GET":
                return await self._list(request)
            return await self._register(request)
        except Reject as exc:
            if exc.status in LIMIT_STATUSES:
                self.stats.http_limited[exc.status] += 1
            headers = {"Retry-After": str(math.ceil(exc.retry_after_ms / 1000))} if exc.retry_after_ms else None
            return json_response({"error": exc.message}, exc.status, headers)
        except BackplaneUnavailable:
            return json_response({"error": "backplane unavailable, retry later"}, 503)
        except RegistryFull:
            log.warning("registration refused: MAX_MESHES=%d reached", self.settings.max_meshes)
            self.stats.http_limited[507] += 1
            return json_response({"error": "registry full"}, 507)
        except OSError as exc:  # the registry file could not be written: nothing was acknowledged
            log.error("registry write failed: %s", exc)
            return json_response({"error": "registry could not be saved, retry later"}, 503)

    async def _register(self, request: Request) -> Response:
        admin = self._is_admin(request)
        if self.settings.gateway_admin_token is not None and not admin:
            raise Reject(401, "registration is closed: Authorization: Bearer <token> required")
        ip = client_ip(request.scope)
        if not admin and (wait_ms := self.registrations.take(f"ip:{ip}")):
            raise Reject(429, f"too many registrations from {ip}, retry later", retry_after_ms=wait_ms)
        body: RegisterBody = await read_json(request, RegisterBody, timeout=self.settings.auth_timeout_s)
        for _ in range(3):  # compare-and-set: retry if another request changed the entry meanwhile
            current = await self.registry.get(body.mesh_id)
            if current is None or admin:
                secret_hash = await self._hash(body.new_secret or body.secret)
            elif not await self._check(body.mesh_id, ip, body.secret, current.secret_hash):
                if self.refusals.allow():
                    log.info("register %s refused: already registered", body.mesh_id)
                raise Reject(409, "meshId already registered")
            elif body.new_secret is not None or is_legacy(current.secret_hash):
                secret_hash = await self._hash(body.new_secret or body.secret)
            elif body.name == current.name:
                return json_response({"ok": True, "created": False})  # a node's UI re-registering
            else:
                secret_hash = current.secret_hash
            created = current.created if current is not None else time.time()
            mesh = Mesh(mesh_id=body.mesh_id, name=body.name, secret_hash=secret_hash, created=created)
            if await self.registry.put(mesh, expect=current):
                if current is not None and current.name != mesh.name:
                    await self.hub.backplane.notify(mesh.mesh_id, name=mesh.name)
                log.info("mesh %s %s", mesh.mesh_id, "registered" if current is None else "updated")
                return json_response({"ok": True, "created": current is None})
        raise Reject(409, "meshId already registered")

    async def _list(self, request: Request) -> Response:
        """Admin: the registered meshes, `limit` at a time after the meshId `after`."""
        if not self._is_admin(request):
            raise Reject(401, "listing meshes needs Authorization: Bearer <GATEWAY_ADMIN_TOKEN>")
        limit = request.query_params.get("limit", "1000")
        if not limit.isdigit() or not 1 <= int(limit) <= 10000:
            raise Reject(400, "limit must be 1-10000")
        meshes = await self.registry.listing(after=request.query_params.get("after", ""), limit=int(limit))
        hub = self.hub
        for mesh in meshes:
            mesh.connected = mesh.mesh_id in hub.online
        return json_response({"meshes": meshes, "next": meshes[-1].mesh_id if len(meshes) == int(limit) else None})

    async def _unregister(self, request: Request) -> Response:
        admin = self._is_admin(request)
        body: UnregisterBody = await read_json(request, UnregisterBody, timeout=self.settings.auth_timeout_s)
        current = await self.registry.get(body.mesh_id)
        if current is None:
            raise Reject(404, "unknown meshId")
        if not admin:
            if body.secret is None:
                raise Reject(400, "Object missing required field `secret`")
            if not await self._check(body.mesh_id, client_ip(request.scope), body.secret, current.secret_hash):
                raise Reject(403, "wrong secret")
        if not await self.registry.delete(current):
            raise Reject(409, "meshId changed meanwhile, retry")
        await self.hub.backplane.notify(body.mesh_id, close=True)
        log.info("mesh %s unregistered", body.mesh_id)
        return json_response({"ok": True})

    async def health(self, request: Request) -> Response:
        hub = self.hub
        ok = hub.healthy and not self.draining
        body: dict[str, Any] = {"ok": ok, "connected": len(hub.peers)}
        if hub.mailboxes is not None:
            body["away"], body["queued"] = len(hub.mailboxes.readers), hub.mailboxes.queued
        if self.settings.redis_url:
            body["clusterConnected"] = len(hub.online) if hub.healthy else None
        if self.draining:
            body["draining"] = True
        return json_response(body, 200 if ok else 503)

    # --- Endpoints: WebSocket ---

    async def gateway_ws(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """A raw ASGI endpoint: the relay path skips Starlette's WebSocket wrapper."""
        hub = self.hub
        if (await receive())["type"] != "websocket.connect":
            return
        if self.sockets >= self.settings.max_connections or self.pending >= self.settings.max_pending_auth:
            if self.refusals.allow():
                log.warning("handshake refused: %d sockets, %d not authenticated", self.sockets, self.pending)
            self.stats.refused["capacity"] += 1
            await refuse(scope, send, 503)  # before any per-socket state exists
            return
        self.sockets += 1
        self.pending += 1
        self.stats.accepted += 1
        ip = client_ip(scope)  # before the accept: GatewayProtocol then drops the request's headers
        await send({"type": "websocket.accept"})
        socket: Socket | None = scope.get("extensions", {}).get(SOCKET_EXTENSION)
        peer = Peer(send, self.settings, socket, self.stats)
        peer.ip = ip
        if socket is not None:  # SIGTERM: the node confirms what it got before the 1012
            socket.set_on_shutdown(lambda: hub.drain_soon(peer))
        peer.auth_deadline = asyncio.get_running_loop().call_later(
            self.settings.auth_timeout_s, self._auth_timeout, peer
        )
        opened = time.monotonic()
        ended: Message = {}
        try:
            while True:
                message = await receive()
                if message["type"] != "websocket.receive":  # websocket.disconnect
                    ended = message
                    return
                if peer.closing:
                    continue
                data = message.get("text")
                await self._handle(peer, data if data is not None else message.get("bytes") or b"", hub)
        except Exception:  # the one boundary per connection: a bug here closes this socket (1011), no other
            log.exception("mesh %s: connection failed", peer.mesh_id)
            peer.close(CLOSE_INTERNAL, "internal error")
            if isinstance(peer.writer, asyncio.Task):
                await asyncio.wait([peer.writer], timeout=2)
        finally:
            self.sockets -= 1
            self.pending -= peer.mesh_id is None
            code = peer.goodbye.code if peer.goodbye is not None else ended.get("code", 1006)
            who = peer.mesh_id or "(not authenticated)"
            seconds = time.monotonic() - opened
            if peer.mesh_id is not None or self.refusals.allow():
                log.info("%s disconnected: %d after %.1f s", who, code, seconds, extra=peer.context("disconnect", code))
            self.stats.closed[code] += 1
            if socket is not None and socket.dropped:  # it pinged and never read: a cut-off too
                self.stats.cut_off += 1
            if peer.auth_deadline is not None:
                peer.auth_deadline.cancel()
            if peer.writer is not None:
                peer.writer.cancel()
            hub.forget(peer)

    async def _handle(self, peer: Peer, data: str | bytes, hub: Hub) -> None:
        """Size-check and decode one message, then authenticate or dispatch it."""
        size = utf8_size(data) if isinstance(data, str) else len(data)
        self.stats.bytes_in += size
        if size > self.settings.max_frame_bytes:
            hard_cap = self.settings.ws_max_bytes if peer.mesh_id is not None else PRE_AUTH_MAX_BYTES
            if size > hard_cap:  # only reached when the server allows more (under a host's own server)
                peer.close(CLOSE_TOO_BIG, "message too big", flush=False)
                return
            message = f"frame of {size} bytes exceeds MAX_FRAME_BYTES={self.settings.max_frame_bytes}"
            peer.send_frame(Error(message=message, code=FRAME_TOO_LARGE, id=frame_id_of(read_head(data))))
            return
        frame = decode_frame(data, self.decoder)
        self.stats.frames_in[frame.__class__] += 1
        if isinstance(frame, Error):
            peer.send_frame(frame)
        elif peer.mesh_id is not None:
            await dispatch(peer, frame, hub)
        elif isinstance(frame, Auth):
            await self._authenticate(peer, frame, hub)
        else:
            peer.send_frame(AuthError(message="Not authenticated"))

    async def _authenticate(self, peer: Peer, frame: Auth, hub: Hub) -> None:
        if peer.auth_deadline is not None:  # the node sent its auth in time; checking it may take a while
            peer.auth_deadline.cancel()
            peer.auth_deadline = None
        keys = (f"mesh:{frame.mesh_id}", f"ip:{peer.ip}")
        if wait_ms := self.failures.wait_ms(*keys):  # throttled: the secret is not even checked
            self._refused(peer, frame.mesh_id, "too many attempts", 1013)
            self.stats.auth_failed["throttled"] += 1
            peer.send_frame(AuthError(message="Too many attempts", retry_after_ms=wait_ms))
            peer.close(CLOSE_TRY_AGAIN, "too many attempts")
            return
        try:
            if not hub.healthy:
                raise BackplaneUnavailable
            mesh = await self.registry.get(frame.mesh_id)
            # An unknown meshId is refused without hashing anything: which meshIds exist is no secret
            # (DELETE /register answers 404 or 403, POST 409), so hashing a dummy hid nothing, and it
            # made a flood of guesses for ids nobody registered cost the CPU a legit auth needs
            # (bench guess-flood, spread side).
            urgent = mesh is not None and self.failures.clean(*keys)  # likely legit: checked first
            valid = mesh is not None and await self._verify(frame.secret, mesh.secret_hash, urgent=urgent)
            if mesh is not None and valid and is_legacy(mesh.secret_hash):  # the Node gateway's hash: upgrade it now
                upgraded = Mesh(mesh.mesh_id, mesh.name, await self._hash(frame.secret), mesh.created or time.time())
                try:
                    await self.registry.put(upgraded, expect=mesh)
                    log.info("mesh %s: secret hash upgraded", mesh.mesh_id)
                except OSError as exc:  # the old hash still works; the upgrade is retried next auth
                    log.error("mesh %s: secret hash upgrade not saved: %s", mesh.mesh_id, exc)
        except BackplaneUnavailable:  # no secret can be checked: send the node elsewhere
            self.stats.auth_failed["service_unavailable"] += 1
            peer.send_frame(AuthError(message="Service unavailable"))
            peer.close(CLOSE_TRY_AGAIN, "service unavailable")
            return
        if peer.closing:
            return  # closed meanwhile (gateway shutting down)
        if mesh is None or not valid:
            self._refused(peer, frame.mesh_id, "invalid credentials", 1008)
            self.failures.take(*keys)
            self.stats.auth_failed["invalid_credentials"] += 1
            peer.send_frame(AuthError(message="Invalid credentials"))
            peer.close(CLOSE_POLICY, "invalid credentials")
            return
        self.pending -= 1
        self.stats.auth_ok += 1
        if peer.socket is not None:
            peer.socket.authenticated()  # its messages may now be up to WS_MAX_BYTES
        peer.mesh_id, peer.name = mesh.mesh_id, mesh.name
        peer.participants, peer.public_rooms = frame.participants, frame.public_rooms
        await hub.attach(peer, AuthOk(mesh_id=mesh.mesh_id, name=mesh.name))
        log.info("mesh %s connected from %s", mesh.mesh_id, peer.ip, extra=peer.context("connect"))

    def _refused(self, peer: Peer, mesh_id: str, why: str, code: int) -> None:
        if self.refusals.allow():
            context = peer.context("auth_refused", code)
            log.info("auth refused for %r from %s: %s", mesh_id[:64], peer.ip, why, extra=context)

    def _auth_timeout(self, peer: Peer) -> None:
        if peer.mesh_id is None and not peer.closing:
            self.stats.auth_failed["timeout"] += 1
            peer.send_frame(AuthError(message="Auth timeout"))
            peer.close(CLOSE_POLICY, "auth timeout")
            if peer.socket is not None:  # it may not read its close: the socket goes anyway
                asyncio.get_running_loop().call_later(1.0, peer.socket.abort)


def create_app(settings: Settings | None = None) -> Starlette:
    gateway = Gateway(settings)
    return Starlette(routes=gateway.routes, lifespan=gateway.lifespan)


def serving_app(gateway: Gateway) -> Callable[[dict[str, Any], Receive, Send], Awaitable[None]]:
    """What `python gateway.py` serves: the gateway's Starlette app, except that a
    WebSocket to /gateway goes straight to its endpoint. Starlette's routing and middleware
    would hold six more coroutine frames and their closures for every socket as long as it
    lives (measured with tracemalloc: about 3 KB of an idle socket's 23 KB)."""
    app = Starlette(routes=gateway.routes, lifespan=gateway.lifespan)
    endpoint = gateway.gateway_ws

    def serve(scope: dict[str, Any], receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "websocket" and scope["path"] == "/gateway":
            return endpoint(scope, receive, send)
        return app(scope, receive, send)

    return serve


# GatewayProtocol puts itself in scope["extensions"] under this key: a `Socket`.
SOCKET_EXTENSION = "mesh_gateway.socket"
PRE_AUTH_MAX_BYTES = 16 * 1024  # the largest message before gateway_auth_ok (an auth frame is far smaller)
MAX_HEADER_BYTES = 16 * 1024  # HTTP request headers; larger: 431
# The header of an unmasked, unfragmented text frame of n < 126 bytes (RFC 6455 5.2).
SHORT_TEXT_HEADERS = [bytes((0x81, n)) for n in range(126)]


def text_frame_header(size: int) -> bytes:
    """The server-side header of one text frame (FIN, opcode 1, no mask) of `size` bytes."""
    if size < 126:
        return SHORT_TEXT_HEADERS[size]
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size)
    return struct.pack("!BBQ", 0x81, 127, size)


NEED_MORE, NOT_OURS = 0, -1  # what client_frame_head says instead of an opcode


def client_frame_head(data: bytes, pos: int, max_size: int | None) -> tuple[int, int, int]:
    """The client frame at `pos` (RFC 6455 5.2): (opcode, payload start, payload size) for a
    masked, final text (1), binary (2), ping (9) or pong (10) frame within `max_size`;
    (NEED_MORE, 0, 0) if its header is not all here; (NOT_OURS, 0, 0) for anything else
    (RSV bits, unmasked, a fragment, a close, a control frame over 125 bytes, too big)."""
    available = len(data) - pos
    if available < 2:
        return NEED_MORE, 0, 0
    first, second = data[pos], data[pos + 1]
    opcode, size = first & 0x0F, second & 0x7F
    if first & 0xF0 != 0x80 or not second & 0x80 or opcode not in (1, 2, 9, 10) or (opcode > 2 and size > 125):
        return NOT_OURS, 0, 0
    head = 6 if size < 126 else 8 if size == 126 else 14
    if available < head:
        return NEED_MORE, 0, 0
    if size >= 126:
        size = int.from_bytes(data[pos + 2 : pos + head - 4])
    if max_size is not None and size > max_size:
        return NOT_OURS, 0, 0
    return opcode, pos + head, size


@functools.cache
def gateway_protocol(send_buffer_bytes: int) -> type[asyncio.Protocol]:
    """uvicorn's websockets-sansio protocol plus what ASGI cannot say (the `Socket` the app
    finds in its scope): write every frame queued for a socket in one transport write, with
    no ASGI message, coroutine or websockets frame object per frame; send a ping and hear its
    pong (a node's pong confirms every frame before the ping); on shutdown let the app
    collect those confirmations before it closes with 1012; messages of at most 16 KiB
    until the socket authenticates; pongs count against the send buffer (a peer that pings
    and never reads is dropped); and an abort. The handshake's request and response are
    dropped once it is through (an idle socket holds less). Built on first use, so
    importing the gateway does not import uvicorn."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from websockets.frames import Frame, Opcode
    from websockets.protocol import State

    try:
        from websockets.speedups import apply_mask  # websockets' C helper
    except ImportError:  # pragma: no cover - websockets built without its C extension
        from websockets.utils import apply_mask

    open_state = State.OPEN

    class GatewayProtocol(WebSocketsSansIOProtocol):
        on_shutdown: Callable[[], None] | None = None
        on_writable: Callable[[], None] | None = None
        dropped = False  # for pinging without reading (the metrics count it as a cut-off)
        confirm_waiters: dict[bytes, Callable[[], None]] | None = None  # made by the first ping
        confirm_count = 0
        # Frame parsing: websockets' parser until the handshake is through, then our own
        # (`parse_frames`) for as long as the client sends what it handles; anything else
        # (a close, a fragment, a frame too big, a protocol error) goes to websockets' parser
        # from that frame on, for good. `early` marks bytes that reached websockets' parser
        # after the request (a client that did not wait for the 101): it then keeps them all.
        own_parser = False
        early = False
        unparsed = b""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.logger = self.conn.logger = SOCKET_LOG

        def data_received(self, data: bytes) -> None:
            if self.own_parser:
                self.parse_frames(self.unparsed + data if self.unparsed else data)
                return
            if self.handshake_initiated:
                self.early = True
            super().data_received(data)

        def parse_frames(self, data: bytes) -> None:
            """Masked, unfragmented text, binary, ping and pong frames from the client, handled
            as websockets would; the first other frame and everything after it go to websockets'
            parser. Measured: websockets' generator-based parser was a fifth of the gateway's
            CPU in the relay bench."""
            pos, end = 0, len(data)
            while pos < end:
                opcode, start, size = client_frame_head(data, pos, self.conn.max_message_size)
                if opcode == NOT_OURS:
                    self.own_parser, self.unparsed = False, b""
                    super().data_received(data[pos:])
                    return
                if opcode == NEED_MORE or end < start + size:
                    break
                payload = apply_mask(data[start : start + size], data[start - 4 : start])
                pos = start + size
                if opcode == 9:
                    self.handle_ping(payload)
                elif opcode == 10:
                    self.handle_pong(Frame(Opcode.PONG, payload))
                else:
                    self.curr_msg_data_type = "text" if opcode == 1 else "bytes"
                    self.frames = [payload]
                    self.send_receive_event_to_app()
                if self.disconnected or self.transport.is_closing():
                    return
            self.unparsed = data[pos:]

        def handle_connect(self, event: Any) -> None:
            self.conn.max_message_size = min(self.config.ws_max_size, PRE_AUTH_MAX_BYTES)
            super().handle_connect(event)
            if self.handshake_initiated and hasattr(self, "scope"):  # the app runs from the next loop turn
                extensions: dict[str, Any] = self.scope["extensions"]  # ASGI's types say dicts; ours is this
                extensions[SOCKET_EXTENSION] = self

        async def send(self, message: Any) -> None:
            await super().send(message)
            if message["type"] == "websocket.accept" and self.handshake_complete:
                self.forget_handshake()

        def forget_handshake(self) -> None:
            """The handshake is through: what only it needed goes (an idle socket holds less)."""
            del self.request, self.response
            self.scope["headers"] = []  # the app read what it needed (the client's address) before its accept
            self.own_parser = not self.early and not self.conn.extensions
            if self.own_parser:  # websockets' parser is idle from now on: a fresh one holds no request
                self.conn.parser = self.conn.parse()
                next(self.conn.parser)

        @property
        def paused(self) -> bool:
            return not self.writable.is_set()

        def write_texts(self, frames: list[bytes]) -> None:
            if self.close_sent or self.disconnected or self.conn.state is not open_state:
                return  # closing: the app hears of it from its receive
            if self.conn.extensions:  # per-message deflate was negotiated: websockets compresses
                for frame in frames:
                    self.conn.send_text(frame)
                self.transport.write(b"".join(self.conn.data_to_send()))
                return
            parts = []
            for frame in frames:
                parts.append(text_frame_header(len(frame)))
                parts.append(frame)
            self.transport.write(b"".join(parts))

        def when_writable(self, callback: Callable[[], None]) -> None:
            if self.disconnected:
                callback()
            else:
                self.on_writable = callback

        def resume_writing(self) -> None:
            super().resume_writing()
            self._writable()

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            self._writable()

        def _writable(self) -> None:
            if self.on_writable is not None:
                callback, self.on_writable = self.on_writable, None
                callback()

        def authenticated(self) -> None:
            self.conn.max_message_size = self.config.ws_max_size

        def abort(self) -> None:
            self.transport.abort()

        def ping(self, callback: Callable[[], None]) -> bool:
            if self.close_sent or self.disconnected or self.transport.is_closing():
                return False
            self.confirm_count += 1
            payload = b"confirm-%d" % self.confirm_count  # never 4 bytes: uvicorn's keepalive pings are
            if self.confirm_waiters is None:
                self.confirm_waiters = {}
            self.confirm_waiters[payload] = callback
            self.conn.send_ping(payload)
            self.transport.write(b"".join(self.conn.data_to_send()))
            return True

        def handle_ping(self, payload: bytes | None = None) -> None:
            """A ping (`payload` when our parser read it; else websockets queued the pong)."""
            if self.transport.get_write_buffer_size() > send_buffer_bytes:  # pings, and never reads
                self.logger.warning("%s:%d - pinging without reading: dropped", *(self.client or ("?", 0)))
                self.dropped = True
                self.transport.abort()
                return
            if payload is not None and self.conn.state is open_state:
                self.conn.send_pong(payload)
            super().handle_ping()

        def handle_pong(self, event: Any) -> None:
            waiters = self.confirm_waiters
            callback = waiters.pop(bytes(event.data), None) if waiters else None
            if waiters is not None and not waiters:
                self.confirm_waiters = None  # an idle socket holds no empty dict
            if callback is None:
                super().handle_pong(event)  # a keepalive pong
            elif not self.disconnected:
                callback()

        def set_on_shutdown(self, callback: Callable[[], None]) -> None:
            self.on_shutdown = callback

        def shutdown(self) -> None:
            if self.on_shutdown is None or self.close_sent or self.disconnected or not self.handshake_complete:
                super().shutdown()
                return
            callback, self.on_shutdown = self.on_shutdown, None
            callback()  # the app closes with 1012 within 2 s; uvicorn waits for its task

    return GatewayProtocol


class Pacer:
    """New connections are taken up at most `per_turn` a loop turn, in arrival order; the
    others wait, their reading paused, for the next turns. A reconnect storm's thousands of
    handshakes and auths then spread over many short turns instead of a few long ones, and
    the meshes already connected are served between them (measured: one turn of a 5,000
    mesh storm otherwise held the loop for 1.6 s even on the bare-uvicorn ceiling)."""

    def __init__(self, per_turn: int) -> None:
        self.per_turn = per_turn
        self.left = per_turn  # connections this turn may still take up
        self.waiting: deque[tuple[asyncio.Transport, Callable[[], None]]] = deque()
        self.refill: asyncio.Handle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def admit(self, transport: asyncio.Transport, later: Callable[[], None]) -> bool:
        """True: go on now; False: the connection waits, and `later` is called when its turn comes."""
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # a new server's loop (tests run many): nothing of the old one's applies
            self.loop, self.left, self.waiting, self.refill = loop, self.per_turn, deque(), None
        if self.refill is None:
            self.refill = loop.call_soon(self._next_turn)
        if self.left > 0 and not self.waiting:
            self.left -= 1
            return True
        transport.pause_reading()
        self.waiting.append((transport, later))
        return False

    def _next_turn(self) -> None:
        self.refill, self.left = None, self.per_turn
        try:
            while self.waiting and self.left > 0:
                transport, later = self.waiting.popleft()
                if transport.is_closing():
                    continue  # it left while waiting
                self.left -= 1
                transport.resume_reading()
                later()
        finally:  # a connection whose handling failed never holds up the ones behind it
            if self.waiting and self.refill is None and self.loop is not None:
                self.refill = self.loop.call_soon(self._next_turn)


HANDSHAKES_PER_TURN = 32  # new connections a loop turn takes up (see Pacer)


@functools.cache
def http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with a cap on request headers (uvicorn has none for it):
    past MAX_HEADER_BYTES the request is answered 431 before more is buffered. A new
    connection's first bytes wait for the `Pacer`."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHeadersProtocol(HttpToolsProtocol):
        header_bytes = 0  # of the request whose headers are arriving; -1: in a body; -2: refused
        tail = b""
        in_headers = False  # the parser is inside a request's headers
        admitted = False  # taken up by the pacer
        refused = 0  # requests answered 431, in this process (the metrics read it)
        pacer = Pacer(HANDSHAKES_PER_TURN)  # one for the server: this class is built once (functools.cache)

        def data_received(self, data: bytes) -> None:
            if not self.admitted:  # a new connection's first bytes: now, or when the pacer says
                self.admitted = True
                if not self.pacer.admit(self.transport, lambda: self.data_received(data)):
                    return
            if self.header_bytes == -2:
                return
            if self.header_bytes >= 0:  # this data starts inside a request's headers: count up to their end
                seen = self.tail + data
                end = seen.find(b"\r\n\r\n")
                self.header_bytes += len(data) if end < 0 else max(0, end - len(self.tail))
                self.tail = seen[-3:]
                if self.header_bytes > MAX_HEADER_BYTES:
                    self.refuse_headers()
                    return
            super().data_received(data)
            if self.header_bytes == 0 and self.in_headers:
                # A request began after another ended in this same data (a client that sends its next
                # request right behind a body): count what the parser has of its headers so far.
                self.header_bytes = len(self.url) + sum(len(n) + len(v) for n, v in self.headers)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.in_headers = True

        def on_headers_complete(self) -> None:
            self.header_bytes, self.in_headers = -1, False  # its body is not counted
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self.header_bytes, self.tail = 0, b""  # the next request on this connection

        def refuse_headers(self) -> None:
            """431, then discard what the client still sends (closing with unread input would reset
            the connection before the client reads the answer) and close after a grace second."""
            body = b'{"error":"request headers larger than 16 KiB"}'
            head = "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            self.transport.write(head.encode() + body)
            self.header_bytes = -2  # refused: everything else is dropped
            BoundedHeadersProtocol.refused += 1
            self.loop.call_later(1.0, self.transport.close)

    return BoundedHeadersProtocol


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How `python gateway.py` (and so the Procfile) runs uvicorn: the fastest stack
    that still applies write backpressure (websockets-sansio, uvloop, httptools), with
    the confirmation pings offline delivery needs."""
    return {
        "host": settings.host,
        "port": settings.port,
        "ws": gateway_protocol(settings.send_buffer_bytes),
        "interface": "asgi3",  # serving_app is a plain function that returns the coroutine
        "loop": "uvloop",
        "http": http_protocol(),
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "ws_max_size": settings.ws_max_bytes,
        "ws_ping_interval": settings.ping_interval_s,
        "ws_ping_timeout": settings.ping_timeout_s,
        "ws_per_message_deflate": settings.ws_per_message_deflate,
        "timeout_graceful_shutdown": 5,
        "backlog": 4096,  # a restart's reconnect storm arrives at once
        "log_level": settings.log_level,
        "server_header": False,
    }


VERSION = "0.3.0"
DRAIN_S = 1.0  # on SIGTERM, /health answers 503 this long before the sockets close (load balancers move on)


class StartupError(Exception):
    """The gateway cannot start as configured: one line, exit code 1."""


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if "--version" in args:
        sys.stdout.write(f"mesh-gateway {VERSION}\n")
        return
    if "--help" in args or "-h" in args:
        sys.stdout.write(settings_help())
        return
    try:
        settings = Settings.from_env()
        configure_logging(settings)
        listener = preflight(settings)
    except (SettingsError, StartupError) as exc:
        sys.exit(str(exc))
    raise_file_limit()
    import uvicorn

    gateway = Gateway(settings)
    app = serving_app(gateway)
    config = uvicorn.Config(app, **uvicorn_options(settings), log_config=None)  # our logging, one format
    config.load()  # everything the server runs is imported now, before tune_gc
    tune_gc()
    draining_server(gateway)(config).run(sockets=[listener])


def tune_gc() -> None:
    """`python gateway.py` only (a host keeps its own): the objects of start-up (modules,
    classes, the app) leave the cycle collector's view for good (`gc.freeze`), and the
    oldest generation is collected after 100 collections of the middle one instead of 10.
    Measured with `gc.callbacks` (bench, 2026-12-08): in the 5,000-mesh reconnect storm the
    default thresholds made 6 collections of the oldest generation (146 ms median, 245 ms
    at most), the connected meshes' worst stalls; with this, none. The youngest generation
    stays at the default 700 (0.1-0.4 ms a collection): at 10,000 its collections took 3-8
    ms (the middle one's 7-65 ms), and a legit auth during a flood of guesses met one often
    enough to double its p99."""
    gc.freeze()
    gc.set_threshold(700, 10, 100)


def preflight(settings: Settings) -> socket.socket:
    """What would otherwise fail after a false start: the database, Redis, the address."""
    if settings.redis_url:
        check_redis(settings.redis_url)
    else:
        check_database(settings.db_path)
    return listen(settings.host, settings.port)


def check_database(path: str) -> None:
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=2)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise StartupError(f"DB_PATH={path!r}: cannot open or write the database ({exc})") from None


def check_redis(url: str) -> None:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        client.ping()
        client.close()
    except ValueError as exc:
        raise StartupError(f"invalid setting REDIS_URL={url!r}: {exc}") from None
    except (redis.RedisError, OSError) as exc:
        raise StartupError(f"REDIS_URL={url!r}: Redis did not answer within 3 s ({exc})") from None


def listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket now, so a bad HOST or a taken PORT stops start-up with one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise StartupError(f"cannot listen on HOST={host!r} PORT={port} ({exc})") from None
    sock.set_inheritable(True)
    return sock


def draining_server(gateway: Gateway) -> type[Any]:
    """uvicorn's Server, but the first SIGTERM makes /health answer 503 ("draining") for DRAIN_S
    before the usual shutdown (1012 to every socket) begins."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        drain_until: float | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.drain_until is None and not self.should_exit and gateway.sockets:  # nothing to drain: stop now
                gateway.draining = True
                self.drain_until = time.monotonic() + DRAIN_S
                return
            super().handle_exit(sig, frame)  # a second signal: now

        async def on_tick(self, counter: int) -> bool:
            if self.drain_until is not None and time.monotonic() >= self.drain_until:
                return True
            return await super().on_tick(counter)

    return DrainingServer


class JsonFormatter(logging.Formatter):
    """LOG_FORMAT=json: one object a line, the context fields always present (null when unknown)."""

    FIELDS = ("event", "mesh_id", "conn", "ip", "code")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {name: getattr(record, name, None) for name in self.FIELDS}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return encoder.encode(entry).decode()


def configure_logging(settings: Settings) -> None:
    """`python gateway.py` only (an embedding host keeps its own config): one handler, one format,
    for our lines and uvicorn's. Lines are written by a thread of the logging module's own
    (QueueHandler and QueueListener): formatting and writing them cost the event loop 17 % of
    its time in a 5,000-mesh reconnect storm, two lines a mesh (py-spy)."""
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.formatter.converter = time.gmtime  # type: ignore[union-attr]
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = logging.handlers.QueueListener(lines, handler)
    writer.start()
    atexit.register(writer.stop)  # what is queued is written before the process ends
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(lines)]
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True


def settings_help() -> str:
    """`python gateway.py --help`: every setting with its default."""
    lines = [f"mesh-gateway {VERSION}: a federation relay for mesh chat nodes.", "", "Settings (environment):"]
    for name, default in zip(Settings.__struct_fields__, Settings.__struct_defaults__, strict=True):
        shown = "unset" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        lines.append(f"  {name.upper():<24} {shown}")
    lines += ["", "Run: python gateway.py   Test: python -m pytest   Docs: README.md, PROTOCOL.md", ""]
    return "\n".join(lines)


def raise_file_limit() -> None:
    """Every socket is a file descriptor: the common soft limit of 1,024 would lock everyone out
    after 1,000 idle connections, so take the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.info("file descriptor limit: %d", resource.getrlimit(resource.RLIMIT_NOFILE)[0])


if __name__ == "__main__":
    # `python gateway.py` runs this file as `__main__`; whoever then imports `gateway` (gateway_redis,
    # a test, a helper) would load it a second time, with its own classes, decoders and hub. So the
    # script only imports the module and runs that one copy's `main`.
    import gateway

    gateway.main()
