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
import contextlib
import hashlib
import hmac
import logging
import math
import multiprocessing
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Annotated, Any, Generic, Literal, Protocol, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

log = logging.getLogger("mesh_gateway")


# --- Settings ---------------------------------------------------------------

PositiveInt = Annotated[int, Meta(gt=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]


class SettingsError(Exception):
    """A bad environment value: one line naming the variable and the value."""


class Settings(Struct, frozen=True, kw_only=True, rename="upper"):
    """Every knob, with its default. Field `rate_limit_per_min` is env `RATE_LIMIT_PER_MIN`."""

    port: Annotated[int, Meta(ge=0, le=65535)] = 4000
    host: str = "0.0.0.0"
    registry_path: str = "registry.json"
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
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    def __post_init__(self) -> None:
        if self.ws_max_bytes < self.max_frame_bytes:
            raise ValueError(
                f"WS_MAX_BYTES={self.ws_max_bytes} is below MAX_FRAME_BYTES={self.max_frame_bytes}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """The only code that reads the environment. Empty values count as unset."""
        names = [name.upper() for name in cls.__struct_fields__]
        raw = {name: environ[name] for name in names if environ.get(name)}
        for name in ("PAYLOAD_POLICY", "LOG_LEVEL"):
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


class ChatMessage(Struct, omit_defaults=True):
    """PAYLOAD_POLICY=mesh: decoding into this struct *is* the whitelist (other keys are dropped)."""

    id: Any = UNSET
    roomId: Any = UNSET
    senderId: Any = UNSET
    senderName: Any = UNSET
    content: Any = UNSET
    isDm: Any = UNSET
    createdAt: Any = UNSET
    fromMesh: Any = UNSET
    fromMeshId: Any = UNSET
    roomName: Any = UNSET
    trustLevel: Any = UNSET  # always rewritten to "federated"


class MeshPayload(Struct, omit_defaults=True):
    type: Any = UNSET
    message: ChatMessage | list[Any] | str | int | float | bool | None | UnsetType = UNSET


ClientFrame = Auth | Discover | Relay[Any] | Broadcast[Any] | UpdateParticipants | UpdateRooms
CLIENT_TAGS = frozenset(cls.__struct_config__.tag for cls in (Auth, Discover, Relay, Broadcast, UpdateParticipants, UpdateRooms))


class AuthOk(Frame, tag="gateway_auth_ok"):
    mesh_id: str
    name: str


class AuthError(Frame, tag="gateway_auth_error"):
    message: str


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


class Ack(Frame, tag="gateway_ack"):
    id: str
    delivered: int


class FrameHead(Struct):
    """What an undecodable frame still tells us: its type and id, if any."""

    type: Any = None
    id: Any = None


FRAME_DECODERS = {  # one per payload policy, built once
    "mesh": msgspec.json.Decoder(
        Auth | Discover | Relay[MeshPayload] | Broadcast[MeshPayload] | UpdateParticipants | UpdateRooms
    ),
    "passthrough": msgspec.json.Decoder(
        Auth | Discover | Relay[dict[str, Any]] | Broadcast[dict[str, Any]] | UpdateParticipants | UpdateRooms
    ),
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
        payload.message.trustLevel = "federated"
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
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        return decode_error(data, exc)


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


# Checked when a mesh is unknown, so a wrong id costs as long as a wrong secret.
DUMMY_HASH = hash_secret("not-a-real-secret")


def hash_batch(jobs: list[tuple[str, str | None]]) -> list[str | bool]:
    """In a worker process: hash each secret (no stored hash given) or verify it."""
    return [hash_secret(secret) if stored is None else verify_secret(secret, stored) for secret, stored in jobs]


def start_worker(parent: int) -> None:
    """A hashing process exits with its gateway, even one killed with SIGKILL."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


class Hasher:
    """Hashes and checks secrets in worker processes, in batches.

    Off the event loop so one auth never stalls other meshes. Processes, not
    threads: a hashing thread must win the GIL back from a busy event loop after
    every secret (up to 5 ms each), which made a reconnect storm of 5,000 meshes
    take 14 s; a batch of secrets costs the loop one hand-off. (Lowering the
    workers' priority starved them behind the loop: 14.6 s, against 8.6 s.)
    """

    BATCH = 64

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self.pool = self._new_pool()
        self.pending: deque[tuple[str, str | None, asyncio.Future[Any]]] = deque()
        self.wakeup = asyncio.Event()
        self.runners = [asyncio.create_task(self._run()) for _ in range(workers)]

    async def start(self) -> None:
        await self.verify("warm-up", DUMMY_HASH)  # start the workers now, not on the first auth

    async def hash(self, secret: str) -> str:
        return await self._submit(secret, None)

    async def verify(self, secret: str, secret_hash: str) -> bool:
        return await self._submit(secret, secret_hash)

    async def close(self) -> None:
        for runner in self.runners:
            runner.cancel()
        await asyncio.to_thread(self.pool.shutdown, True, cancel_futures=True)

    def _new_pool(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")  # never fork a running event loop
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=start_worker, initargs=(os.getpid(),))

    async def _submit(self, secret: str, stored: str | None) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((secret, stored, future))
        self.wakeup.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            batch = [self.pending.popleft() for _ in range(min(self.BATCH, len(self.pending)))]
            pool = self.pool
            try:
                results = await loop.run_in_executor(pool, hash_batch, [(s, h) for s, h, _ in batch])
            except BrokenProcessPool as exc:  # a worker died: fail this batch (never hang it), start new workers
                log.error("a hashing process died (%s): starting new ones", exc)
                if pool is self.pool:
                    self.pool = self._new_pool()
                    pool.shutdown(wait=False)
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (*_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


class Registry(Protocol):
    """Compare-and-set storage: every write names the entry it expects to replace."""

    async def get(self, mesh_id: str) -> Mesh | None: ...

    async def put(self, mesh: Mesh, *, expect: Mesh | None) -> bool: ...

    async def delete(self, mesh: Mesh) -> bool: ...

    async def close(self) -> None: ...


class Put(Struct, tag="put", tag_field="op"):
    mesh: Mesh


class Delete(Struct, tag="delete", tag_field="op", rename="camel"):
    mesh_id: str


journal_decoder = msgspec.json.Decoder(Put | Delete)


def load_registry_file(path: str) -> dict[str, Mesh]:
    """Our snapshot (or the Node gateway's file: a list of entries, or an object keyed
    by meshId), then the changes journaled since it was written."""
    meshes: dict[str, Mesh] = {}
    try:
        with open(path, "rb") as file:
            data = file.read()
        raw = msgspec.json.decode(data) if data.strip() else []
        if isinstance(raw, dict):
            raw = [{"meshId": key, **value} for key, value in raw.items()]
        meshes = {mesh.mesh_id: mesh for mesh in msgspec.convert(raw, list[Mesh])}
    except FileNotFoundError:
        pass
    except (msgspec.DecodeError, TypeError) as exc:  # refuse to start rather than overwrite it
        raise RuntimeError(f"registry file {path} is unreadable ({exc}): fix it or move it away") from None
    for change in read_journal(f"{path}.journal"):
        match change:
            case Put(mesh=mesh):
                meshes[mesh.mesh_id] = mesh
            case Delete(mesh_id=mesh_id):
                meshes.pop(mesh_id, None)
    return meshes


def read_journal(path: str) -> list[Put | Delete]:
    try:
        with open(path, "rb") as file:
            lines = file.read().split(b"\n")
    except FileNotFoundError:
        return []
    changes = []
    for number, line in enumerate(lines, 1):
        try:
            changes.append(journal_decoder.decode(line))
        except msgspec.DecodeError:
            if number < len(lines) - 1:  # only the last line can be torn (a crash mid-append): it was never acked
                raise RuntimeError(f"registry journal {path} is unreadable at line {number}") from None
    return changes


def write_atomically(path: str, data: bytes) -> None:
    """Temp file, fsync, rename, fsync the folder: a crash leaves the old file or the new one."""
    temp = f"{path}.tmp"
    with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    fsync_folder(path)


def fsync_folder(path: str) -> None:
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def append_durably(path: str, data: bytes) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as file:
        new = file.tell() == 0
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    if new:
        fsync_folder(path)


def compact(path: str, snapshot: bytes) -> None:
    """Write the whole registry atomically, then start an empty journal.
    A crash in between replays the old journal onto the new snapshot: same result."""
    write_atomically(path, snapshot)
    with contextlib.suppress(FileNotFoundError):
        os.truncate(f"{path}.journal", 0)


class FileRegistry:
    """The embedded default: all meshes in memory, durable on disk.

    Each change is appended to `<path>.journal` and fsynced before it is
    acknowledged; concurrent changes share one append (group commit). Once the
    journal outgrows the registry, the snapshot `<path>` (plain JSON, the Node
    gateway's format plus fields) is rewritten atomically and the journal
    emptied, so disk work per change stays constant however many meshes there are.
    """

    COMPACT_AFTER = 1000  # journal lines (at least; more for big registries)

    def __init__(self, path: str) -> None:
        self.path = path
        self.meshes = load_registry_file(path)
        self._journal: list[bytes] = []  # changes not yet on disk
        self._journaled = len(read_journal(f"{path}.journal"))
        self._version = 0  # bumped by every change
        self._saved = 0  # the version last made durable
        self._saving: asyncio.Task[None] | None = None

    async def get(self, mesh_id: str) -> Mesh | None:
        return self.meshes.get(mesh_id)

    async def put(self, mesh: Mesh, *, expect: Mesh | None) -> bool:
        return await self._change(mesh.mesh_id, expect, mesh)

    async def delete(self, mesh: Mesh) -> bool:
        return await self._change(mesh.mesh_id, mesh, None)

    async def _change(self, mesh_id: str, expect: Mesh | None, new: Mesh | None) -> bool:
        """Compare-and-set in memory, then make it durable; undone if the disk refuses it."""
        if self.meshes.get(mesh_id) != expect:
            return False
        self._set(mesh_id, new)
        try:
            await self._commit(Put(new) if new is not None else Delete(mesh_id))
        except OSError:
            if self.meshes.get(mesh_id) is new:
                self._set(mesh_id, expect)
            raise
        return True

    def _set(self, mesh_id: str, mesh: Mesh | None) -> None:
        if mesh is None:
            self.meshes.pop(mesh_id, None)
        else:
            self.meshes[mesh_id] = mesh

    async def close(self) -> None:
        """Leave one complete snapshot behind (for backups, or the Node gateway)."""
        if self._saving is not None:
            with contextlib.suppress(OSError):
                await self._saving
        try:
            await asyncio.get_running_loop().run_in_executor(None, compact, self.path, self._snapshot())
        except OSError as exc:  # the journal still holds every acknowledged change
            log.error("registry snapshot not written at shutdown: %s", exc)

    async def _commit(self, change: Put | Delete) -> None:
        self._journal.append(encoder.encode(change) + b"\n")
        self._version += 1
        wanted = self._version
        while self._saved < wanted:
            if self._saving is None or self._saving.done():
                self._saving = asyncio.create_task(self._save())
            await asyncio.shield(self._saving)

    async def _save(self) -> None:
        version, lines, self._journal = self._version, self._journal, []
        loop = asyncio.get_running_loop()
        try:
            if self._journaled + len(lines) > max(self.COMPACT_AFTER, len(self.meshes)):
                await loop.run_in_executor(None, compact, self.path, self._snapshot())
                self._journaled = 0
            else:
                await loop.run_in_executor(None, append_durably, f"{self.path}.journal", b"".join(lines))
                self._journaled += len(lines)
        except OSError:
            self._journaled = sys.maxsize  # lines were lost: the next save rewrites the whole snapshot
            raise
        self._saved = version

    def _snapshot(self) -> bytes:
        return encoder.encode(list(self.meshes.values()))


# --- Hub ----------------------------------------------------------------------
# The live connections. Each peer owns a bounded outbound queue and one writer
# task; the hub only appends to queues, so it never awaits a slow peer.

# uvicorn pauses a socket's writes once its transport holds 64 KiB (asyncio's
# default high-water mark); that much of SEND_BUFFER_BYTES is left for it.
TRANSPORT_HIGH_WATER = 64 * 1024


class Close(Struct, frozen=True):
    code: int
    reason: str = ""


class TokenBucket:
    """`rate_per_min` tokens a minute, with that many as burst."""

    __slots__ = ("capacity", "per_second", "tokens", "stamp")

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


Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class Peer:
    """One WebSocket connection: before auth a stranger, after it one mesh.

    Frames for it wait in `outbox` (bounded by bytes) until its one writer task
    hands them to the server; whoever queues a frame never waits for the socket.
    The writer runs only while there is something to send, so an idle
    connection costs no task.
    """

    __slots__ = (
        "send_asgi", "mesh_id", "name", "conn", "seq", "participants", "public_rooms", "bucket", "on_close",
        "outbox", "queued", "limit", "closing", "goodbye", "dropping", "writer", "auth_deadline",
    )  # fmt: skip

    def __init__(self, send: Send, settings: Settings) -> None:
        self.send_asgi = send
        self.mesh_id: str | None = None
        self.name = ""
        self.conn = os.urandom(8).hex()
        self.seq = 0  # when it claimed its mesh (ns), set by the hub
        self.participants: list[Participant] = []
        self.public_rooms: list[str] = []
        self.bucket = TokenBucket(settings.rate_limit_per_min)
        self.on_close: Callable[[Peer], None] | None = None  # set by the hub that holds this peer
        self.outbox: list[str] = []  # a list, swapped out whole by the writer: cheaper than a deque
        self.queued = 0  # bytes queued and not yet handed to the server
        self.limit = max(settings.send_buffer_bytes - TRANSPORT_HIGH_WATER, settings.send_buffer_bytes // 2)
        self.closing = False
        self.goodbye: Close | None = None  # sent once the outbox is empty
        self.dropping = False  # cut off: what is still queued is dropped, not sent
        self.writer: asyncio.Task[None] | None = None
        self.auth_deadline: asyncio.TimerHandle | None = None

    def send(self, text: str, size: int) -> bool:
        """Queue one text frame of `size` bytes; a peer that stops reading is cut off, not waited for."""
        if self.closing:
            return False
        if self.queued + size > self.limit:
            log.warning("mesh %s: send buffer full, closing", self.mesh_id)
            self.close(CLOSE_TRY_AGAIN, "send buffer full", flush=False)
            return False
        self.outbox.append(text)
        self.queued += size
        self._wake()
        return True

    def send_frame(self, frame: Frame) -> bool:
        data = encoder.encode(frame)
        return self.send(data.decode(), len(data))

    def close(self, code: int, reason: str = "", *, flush: bool = True) -> None:
        """Close after what is queued (or, with flush=False, instead of it)."""
        if self.closing:
            return
        self.closing = True
        self.goodbye = Close(code, reason)
        if not flush:
            self.dropping = True
            self.outbox = []
            self.queued = 0
        self._wake()
        if self.on_close is not None:
            self.on_close(self)

    def presence(self, node: str) -> Presence:
        return Presence(
            mesh_id=self.mesh_id or "",
            name=self.name,
            node=node,
            conn=self.conn,
            seq=self.seq,
            public_rooms=self.public_rooms,
            participants=self.participants,
        )

    def _wake(self) -> None:
        if self.writer is None:
            self.writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        """Send until the outbox is empty (then the close, if one was asked for), and end."""
        send = self.send_asgi
        try:
            while self.outbox:
                # Everything queued is in this batch: it stays counted until all of it is handed over.
                batch, batch_bytes, self.outbox = self.outbox, self.queued, []
                for text in batch:
                    if self.dropping:
                        break
                    await send({"type": "websocket.send", "text": text})  # waits while the socket is full
                if not self.dropping:
                    self.queued -= batch_bytes
            if self.goodbye is not None:
                await send({"type": "websocket.close", "code": self.goodbye.code, "reason": self.goodbye.reason})
        except OSError:
            pass  # the client is gone: the reader sees the disconnect and tears the peer down
        finally:
            self.writer = None


class BackplaneUnavailable(Exception):
    """Redis cannot be reached: the caller answers `backplane_unavailable` (or 503)."""


class Presence(Struct, frozen=True, rename="camel"):
    """A connected mesh as every process sees it."""

    mesh_id: str
    name: str
    node: str  # the process that holds the socket
    conn: str  # the connection; a newer one replaces it
    seq: int  # claim time (ns): the later claim of a mesh wins
    public_rooms: list[str] = []
    participants: list[Participant] = []


class Hub:
    """Every connected mesh: `peers` are the sockets on this process, `meshes` the
    whole cluster's view (this process's included). The backplane moves what
    crosses processes; with MemoryBackplane there is only this process."""

    def __init__(self, settings: Settings, backplane: Backplane) -> None:
        self.settings = settings
        self.backplane = backplane
        self.node = backplane.node
        self.peers: dict[str, Peer] = {}
        self.meshes: dict[str, Presence] = {}
        self.populated: dict[str, Presence] = {}  # the meshes that have participants (a new mesh gets them)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def healthy(self) -> bool:
        return self.backplane.healthy

    def _put(self, presence: Presence) -> Presence:
        self.meshes[presence.mesh_id] = presence
        if presence.participants:
            self.populated[presence.mesh_id] = presence
        else:
            self.populated.pop(presence.mesh_id, None)
        return presence

    def _drop(self, mesh_id: str) -> None:
        del self.meshes[mesh_id]
        self.populated.pop(mesh_id, None)

    # --- this process's peers ---

    async def attach(self, peer: Peer, greeting: Frame) -> None:
        """Make `peer` the mesh's one live connection, tell the cluster, then greet the
        peer and exchange participant lists."""
        mesh_id = peer.mesh_id
        assert mesh_id is not None
        old = self.peers.get(mesh_id)
        before = self.meshes.get(mesh_id)
        peer.seq = time.time_ns()
        peer.on_close = self.forget
        self.peers[mesh_id] = peer
        presence = self._put(peer.presence(self.node))
        if old is not None:
            old.close(CLOSE_REPLACED, "replaced")  # its teardown no longer matches: it changes nothing
        await self._publish(presence)
        peer.send_frame(greeting)
        groups = [group(p) for p in self.populated.values() if p.mesh_id != mesh_id]
        if groups:
            peer.send_frame(Participants(remote_participants=groups))
        if presence.participants or (before is not None and before.participants):
            self._announce(presence)

    def forget(self, peer: Peer) -> None:
        """Drop `peer` unless a newer connection already replaced it; no ghost participants remain."""
        if peer.mesh_id is None or self.peers.get(peer.mesh_id) is not peer:
            return
        del self.peers[peer.mesh_id]
        presence = self.meshes.get(peer.mesh_id)
        if presence is not None and presence.conn == peer.conn:  # else another process took the mesh over
            self._drop(peer.mesh_id)
            if presence.participants:
                self._announce(msgspec.structs.replace(presence, participants=[]))
        self._spawn(self._withdraw(peer.presence(self.node)))  # our own entry in Redis goes either way

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

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a backplane update without holding up the caller (kept until done)."""
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _withdraw(self, presence: Presence) -> None:
        try:
            await self.backplane.withdraw(presence)
        except BackplaneUnavailable:
            log.warning("mesh %s: backplane down, its presence expires by TTL", presence.mesh_id)

    # --- relaying ---

    def incoming(self, sender: Peer, payload: Any) -> bytes:
        payload = federate(payload)
        return encoder.encode(Incoming(from_mesh_id=sender.mesh_id or "", from_mesh_name=sender.name, payload=payload))

    def relay(self, sender: Peer, target: str, payload: Any, frame_id: str | None) -> None:
        """Deliver to one mesh, here or on its process, and answer the sender: an ack
        (if it gave an id) or an error. Across processes the answer comes when Redis
        confirms, so the sender's next frames are read meanwhile."""
        peer = self.peers.get(target)
        if peer is not None:
            data = self.incoming(sender, payload)
            answer_relay(sender, target, frame_id, peer.send(data.decode(), len(data)))
        elif not self.healthy:
            sender.send_frame(unavailable(frame_id))
        elif (presence := self.meshes.get(target)) is None:
            answer_relay(sender, target, frame_id, False)
        else:
            published = self.backplane.relay(presence.node, target, self.incoming(sender, payload))
            published.add_done_callback(lambda done: answer_relay(sender, target, frame_id, receivers(done)))

    def broadcast(self, sender: Peer, payload: Any, frame_id: str | None) -> None:
        """Encode once; deliver here, publish once for the other processes. The ack counts
        the meshes connected cluster-wide, less the sender."""
        data = self.incoming(sender, payload)
        self.fan_out(sender.mesh_id or "", data.decode(), len(data))
        delivered = len(self.meshes) - 1
        if not self.healthy:  # delivered on this process only
            sender.send_frame(unavailable(frame_id))
            return
        published = self.backplane.broadcast(sender.mesh_id or "", data)
        published.add_done_callback(lambda done: answer_broadcast(sender, frame_id, delivered, receivers(done)))

    def deliver(self, mesh_id: str, text: str, size: int) -> None:
        peer = self.peers.get(mesh_id)
        if peer is not None:
            peer.send(text, size)

    def fan_out(self, sender: str, text: str, size: int) -> None:
        for peer in list(self.peers.values()):
            if peer.mesh_id != sender:
                peer.send(text, size)

    async def instances(self) -> list[Instance]:
        """Every connected mesh; only this process's while the backplane is down."""
        meshes = self.meshes.values() if self.healthy else (p.presence(self.node) for p in self.peers.values())
        return [Instance(mesh_id=p.mesh_id, name=p.name, public_rooms=p.public_rooms) for p in meshes]

    # --- what other processes tell us ---

    def apply(self, presence: Presence) -> None:
        """Another process holds (or updated) a mesh."""
        if presence.node == self.node:
            return
        mesh_id = presence.mesh_id
        local = self.peers.get(mesh_id)
        if local is not None and local.seq > presence.seq:
            return  # ours is the newer claim: the other process yields
        before = self.meshes.get(mesh_id)
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
        presence = self.meshes.get(mesh_id)
        if presence is None or presence.conn != conn or presence.node == self.node:
            return
        self._drop(mesh_id)
        if presence.participants:
            self._announce(msgspec.structs.replace(presence, participants=[]))

    def resync(self, remote: dict[str, Presence]) -> None:
        """Make the view of other processes' meshes equal to `remote` (read from Redis)."""
        for mesh_id, presence in list(self.meshes.items()):
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
        """Send a mesh's participant group to every other mesh on this process."""
        data = encoder.encode(Participants(remote_participants=[group(presence)]))
        self.fan_out(presence.mesh_id, data.decode(), len(data))

    async def close_all(self, code: int, reason: str) -> None:
        """Close every socket, wait (briefly) for the closes and the cluster to hear of them."""
        peers = list(self.peers.values())
        for peer in peers:
            peer.close(code, reason)
        pending = [peer.writer for peer in peers if peer.writer is not None] + list(self._tasks)
        if pending:
            await asyncio.wait(pending, timeout=2)


def receivers(published: asyncio.Future[int]) -> int | None:
    """How many processes took a published frame; None if Redis failed."""
    if published.cancelled() or published.exception() is not None:
        return None
    return published.result()


def answer_broadcast(sender: Peer, frame_id: str | None, delivered: int, published: int | None) -> None:
    """A failed publish is always answered (nothing dropped silently); a done one is acked if it had an id."""
    if published is None:
        sender.send_frame(unavailable(frame_id))
    elif frame_id is not None:
        sender.send_frame(Ack(id=frame_id, delivered=delivered))


def answer_relay(sender: Peer, target: str, frame_id: str | None, delivered: int | bool | None) -> None:
    if delivered is None:
        sender.send_frame(unavailable(frame_id))
    elif not delivered:
        message = f"mesh {target!r} is not connected"
        sender.send_frame(Error(message=message, code=TARGET_OFFLINE, id=frame_id, target_mesh_id=target))
    elif frame_id is not None:
        sender.send_frame(Ack(id=frame_id, delivered=1))


def group(presence: Presence) -> ParticipantGroup:
    return ParticipantGroup(mesh_id=presence.mesh_id, mesh_name=presence.name, participants=presence.participants)


# --- Backplane --------------------------------------------------------------
# Moves what crosses processes. MemoryBackplane: one process, nothing to move.
# RedisBackplane: presence in Redis hashes with a TTL, frames over pub/sub.


class Backplane(Protocol):
    node: str  # this process's id
    healthy: bool

    async def start(self, hub: Hub) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, presence: Presence) -> None: ...

    async def withdraw(self, presence: Presence) -> None: ...

    def relay(self, node: str, mesh_id: str, frame: bytes) -> asyncio.Future[int]: ...

    def broadcast(self, sender: str, frame: bytes) -> asyncio.Future[int]: ...

    async def notify(self, mesh_id: str, *, name: str | None = None, close: bool = False) -> None: ...


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


# What processes tell each other on the bus channel and their own channels.
class Bus(Struct, tag_field="k"):
    pass


class Delivery(Bus, tag="relay"):
    mesh_id: str
    frame: msgspec.Raw


class Fanout(Bus, tag="broadcast"):
    node: str
    sender: str
    frame: msgspec.Raw


class Joined(Bus, tag="presence"):
    presence: Presence


class Left(Bus, tag="leave"):
    mesh_id: str
    conn: str


class Changed(Bus, tag="changed"):
    mesh_id: str
    name: str | None = None
    close: bool = False


bus_decoder = msgspec.json.Decoder(Delivery | Fanout | Joined | Left | Changed)
presence_decoder = msgspec.json.Decoder(Presence)

# Redis keys and channels (also in README.md).
KEY_REGISTRY = "mesh:registry"  # hash meshId -> registration JSON (hashed secret)
KEY_IMPORTED = "mesh:imported"  # set of registry-file digests already imported
KEY_NODES = "mesh:nodes"  # set of process ids that may hold meshes
KEY_PRESENCE = "mesh:presence:"  # + process id: hash meshId -> Presence JSON, with a TTL
CHANNEL_BUS = "mesh:bus"  # broadcasts, presence changes, registry changes
CHANNEL_NODE = "mesh:node:"  # + process id: relays to that process's meshes

# Delete a presence entry only if it is still this connection's.
WITHDRAW_LUA = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and cjson.decode(current)['conn'] == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
return redis.call('PUBLISH', KEYS[2], ARGV[3])
"""
# Registry compare-and-set: write ARGV[3] (or delete, if empty) only if the entry is still ARGV[2].
CAS_LUA = """
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""


class RedisBackplane:
    """Many processes, one gateway. One listener task per process subscribes to the
    bus, refreshes this process's presence TTL, and resyncs the cluster view every
    second; when Redis goes away it marks the process unhealthy (503) and keeps
    retrying, then re-announces every local mesh once Redis answers again."""

    SYNC_S = 1.0
    RETRY_S = 0.5

    def __init__(self, settings: Settings) -> None:
        import redis.asyncio as redis  # only when REDIS_URL is set

        # A bounded pool that waits for a free connection rather than failing under bursts.
        pool = redis.BlockingConnectionPool.from_url(
            settings.redis_url or "", max_connections=32, timeout=2, socket_timeout=2, socket_connect_timeout=2
        )
        self.redis = redis.Redis(connection_pool=pool)
        self.errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self.node = os.urandom(6).hex()
        self.healthy = False
        self.ttl_ms = int(settings.presence_ttl_s * 1000)
        self.registry_path = settings.registry_path
        self.key = KEY_PRESENCE + self.node
        self.withdraw_script = self.redis.register_script(WITHDRAW_LUA)
        self.hub: Hub | None = None
        self.task: asyncio.Task[None] | None = None
        self._outgoing: list[tuple[str, bytes, asyncio.Future[int]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._imported = False

    async def start(self, hub: Hub) -> None:
        self.hub = hub
        self.task = asyncio.create_task(self._run())
        self.task.add_done_callback(self._died)
        with contextlib.suppress(TimeoutError):  # serve anyway: /health says 503 until Redis answers
            async with asyncio.timeout(3):
                while not self.healthy and not self.task.done():
                    await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        with contextlib.suppress(*self.errors):
            await self.redis.delete(self.key)
            await self.redis.srem(KEY_NODES, self.node)
        await self.redis.aclose()

    def _died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.healthy = False
            log.error("backplane listener died: %r; /health answers 503", task.exception())

    async def call(self, command: Any) -> Any:
        """Await a Redis command; an outage becomes BackplaneUnavailable."""
        if not self.healthy:
            raise BackplaneUnavailable
        try:
            return await command
        except self.errors as exc:
            log.warning("backplane command failed: %r", exc)
            raise BackplaneUnavailable from exc

    async def publish(self, presence: Presence) -> None:
        data = encoder.encode(presence)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.key, presence.mesh_id, data)
        pipe.pexpire(self.key, self.ttl_ms)
        pipe.sadd(KEY_NODES, self.node)
        pipe.publish(CHANNEL_BUS, encoder.encode(Joined(presence)))
        await self.call(pipe.execute())

    async def withdraw(self, presence: Presence) -> None:
        left = encoder.encode(Left(mesh_id=presence.mesh_id, conn=presence.conn))
        await self.call(self.withdraw_script(keys=[self.key, CHANNEL_BUS], args=[presence.mesh_id, presence.conn, left]))

    def relay(self, node: str, mesh_id: str, frame: bytes) -> asyncio.Future[int]:
        return self._publish(CHANNEL_NODE + node, encoder.encode(Delivery(mesh_id=mesh_id, frame=msgspec.Raw(frame))))

    def broadcast(self, sender: str, frame: bytes) -> asyncio.Future[int]:
        return self._publish(CHANNEL_BUS, encoder.encode(Fanout(node=self.node, sender=sender, frame=msgspec.Raw(frame))))

    async def notify(self, mesh_id: str, *, name: str | None = None, close: bool = False) -> None:
        if not self.healthy:
            raise BackplaneUnavailable
        await self._publish(CHANNEL_BUS, encoder.encode(Changed(mesh_id, name, close)))

    def _publish(self, channel: str, data: bytes) -> asyncio.Future[int]:
        """PUBLISH, pipelined: what every socket publishes meanwhile goes in one round trip.
        The future holds how many processes received it (BackplaneUnavailable if Redis failed)."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._outgoing.append((channel, data, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        try:
            while self._outgoing:
                batch, self._outgoing = self._outgoing, []
                pipe = self.redis.pipeline(transaction=False)
                for channel, data, _ in batch:
                    pipe.publish(channel, data)
                try:
                    results = await pipe.execute()
                except self.errors as exc:
                    log.warning("backplane publish failed: %r", exc)
                    results = [BackplaneUnavailable()] * len(batch)
                for (*_, future), result in zip(batch, results):
                    if future.done():
                        continue  # its sender went away
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._flusher = None

    # --- the listener ---

    async def _run(self) -> None:
        while True:
            try:
                await self._session()
            except self.errors as exc:
                if self.healthy:
                    log.error("backplane lost (%s): /health answers 503 until Redis is back", exc)
                self.healthy = False
            await asyncio.sleep(self.RETRY_S)

    async def _session(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(CHANNEL_BUS, CHANNEL_NODE + self.node)
            if not self._imported:
                await import_registry_file(self.redis, self.registry_path)
                self._imported = True
            await self._announce_all()
            await self._resync()
            self.healthy = True
            log.info("backplane connected (process %s)", self.node)
            loop = asyncio.get_running_loop()
            next_beat = next_sync = loop.time()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                if message is not None:
                    self._receive(message["data"])
                now = loop.time()
                if now >= next_beat:
                    await self._heartbeat()
                    next_beat = now + self.ttl_ms / 3000
                if now >= next_sync:
                    await self._resync()
                    next_sync = now + self.SYNC_S
        finally:
            with contextlib.suppress(*self.errors):
                await pubsub.aclose()

    def _receive(self, data: bytes) -> None:
        assert self.hub is not None
        try:
            message = bus_decoder.decode(data)
        except msgspec.DecodeError as exc:
            log.error("unreadable backplane message: %s", exc)
            return
        match message:
            case Delivery(mesh_id=mesh_id, frame=frame):
                self.hub.deliver(mesh_id, bytes(frame).decode(), len(frame))
            case Fanout(node=node, sender=sender, frame=frame) if node != self.node:
                self.hub.fan_out(sender, bytes(frame).decode(), len(frame))
            case Joined(presence=presence):
                self.hub.apply(presence)
            case Left(mesh_id=mesh_id, conn=conn):
                self.hub.remove(mesh_id, conn)
            case Changed(mesh_id=mesh_id, name=name, close=close):
                self.hub.changed(mesh_id, name=name, close=close)

    async def _announce_all(self) -> None:
        """(Re)write this process's presence: Redis may have restarted empty."""
        assert self.hub is not None
        local = [self.hub.meshes[m] for m in self.hub.peers if m in self.hub.meshes]
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self.key)
        if local:
            pipe.hset(self.key, mapping={p.mesh_id: encoder.encode(p) for p in local})
            pipe.pexpire(self.key, self.ttl_ms)
        pipe.sadd(KEY_NODES, self.node)
        for presence in local:
            pipe.publish(CHANNEL_BUS, encoder.encode(Joined(presence)))
        await pipe.execute()

    async def _heartbeat(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.pexpire(self.key, self.ttl_ms)
        pipe.sadd(KEY_NODES, self.node)
        await pipe.execute()

    async def _resync(self) -> None:
        """Read every process's presence; a process whose hash expired is dead."""
        assert self.hub is not None
        nodes = [n.decode() for n in await self.redis.smembers(KEY_NODES)]
        pipe = self.redis.pipeline(transaction=False)
        for node in nodes:
            pipe.hgetall(KEY_PRESENCE + node)
        remote: dict[str, Presence] = {}
        dead = []
        for node, entries in zip(nodes, await pipe.execute()):
            if not entries and node != self.node:
                dead.append(node)
            for raw in entries.values() if node != self.node else ():
                presence = presence_decoder.decode(raw)
                seen = remote.get(presence.mesh_id)
                if seen is None or seen.seq < presence.seq:
                    remote[presence.mesh_id] = presence
        if dead:
            await self.redis.srem(KEY_NODES, *dead)
        self.hub.resync(remote)


async def import_registry_file(client: Any, path: str) -> None:
    """Moving from one process to many: add the file's meshes Redis lacks, once per file content."""
    try:
        with open(path, "rb") as file:
            digest = hashlib.sha256(file.read()).hexdigest()
    except FileNotFoundError:
        return
    if await client.sismember(KEY_IMPORTED, digest):
        return
    meshes = load_registry_file(path)
    pipe = client.pipeline(transaction=False)
    for mesh in meshes.values():
        pipe.hsetnx(KEY_REGISTRY, mesh.mesh_id, encoder.encode(mesh))
    added = sum(await pipe.execute())
    await client.sadd(KEY_IMPORTED, digest)
    log.info("imported %d of %d meshes from %s into Redis", added, len(meshes), path)


class RedisRegistry:
    """The registry in one Redis hash; writes are compare-and-set (Lua), so two
    processes registering the same id at once cannot both win."""

    def __init__(self, backplane: RedisBackplane) -> None:
        self.backplane = backplane
        self.cas = backplane.redis.register_script(CAS_LUA)

    async def get(self, mesh_id: str) -> Mesh | None:
        raw = await self.backplane.call(self.backplane.redis.hget(KEY_REGISTRY, mesh_id))
        return None if raw is None else msgspec.json.decode(raw, type=Mesh)

    async def put(self, mesh: Mesh, *, expect: Mesh | None) -> bool:
        return await self._swap(mesh.mesh_id, expect, encoder.encode(mesh))

    async def delete(self, mesh: Mesh) -> bool:
        return await self._swap(mesh.mesh_id, mesh, b"")

    async def close(self) -> None:
        pass

    async def _swap(self, mesh_id: str, expect: Mesh | None, new: bytes) -> bool:
        old = b"" if expect is None else encoder.encode(expect)
        return bool(await self.backplane.call(self.cas(keys=[KEY_REGISTRY], args=[mesh_id, old, new])))


# --- Dispatcher -------------------------------------------------------------


async def dispatch(peer: Peer, frame: ClientFrame, hub: Hub) -> None:
    """Handle one decoded frame from an authenticated peer."""
    match frame:
        case Discover():
            peer.send_frame(DiscoverResult(instances=await hub.instances()))
        case Relay(target_mesh_id=target, payload=payload, id=frame_id):
            if admit(peer, frame_id):
                hub.relay(peer, target, payload, frame_id)
        case Broadcast(payload=payload, id=frame_id):
            if admit(peer, frame_id):
                hub.broadcast(peer, payload, frame_id)
        case UpdateParticipants(participants=participants):
            await hub.set_participants(peer, participants)
        case UpdateRooms(public_rooms=rooms):
            await hub.set_rooms(peer, rooms)
        case Auth(id=frame_id):
            peer.send_frame(Error(message="already authenticated", code=ALREADY_AUTHENTICATED, id=frame_id))


def unavailable(frame_id: str | None) -> Error:
    return Error(message="backplane unavailable: not relayed to other processes", code=BACKPLANE_UNAVAILABLE, id=frame_id)


def admit(peer: Peer, frame_id: str | None) -> bool:
    """Rate limit relays and broadcasts; an over-limit frame is answered, never relayed."""
    wait_ms = peer.bucket.take()
    if wait_ms:
        peer.send_frame(
            Error(message="rate limit exceeded", code=RATE_LIMITED, id=frame_id, retry_after_ms=wait_ms)
        )
    return not wait_ms


# --- Endpoints: request bodies and HTTP errors --------------------------------

MeshIdField = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
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

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_response(content: Any, status: int = 200) -> Response:
    return Response(encoder.encode(content), status_code=status, media_type="application/json")


async def read_json(request: Request, kind: type[Struct]) -> Any:
    """The body, decoded into `kind`; 413 past 16 KiB whether declared or streamed."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise Reject(413, "body larger than 16 KiB")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise Reject(413, "body larger than 16 KiB")
    try:
        value = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise Reject(400, str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise Reject(400, f"invalid JSON: {exc}") from None
    if isinstance(value, RegisterBody) and not value.name.isprintable():
        raise Reject(400, "name must be printable - at `$.name`")
    return value


# --- Endpoints and assembly: the Gateway (routes, lifespan), create_app, main -


class AsgiEndpoint:
    """Makes Starlette route to `endpoint` as a plain ASGI app (it wraps functions and methods)."""

    __slots__ = ("endpoint",)

    def __init__(self, endpoint: Callable[[dict[str, Any], Receive, Send], Awaitable[None]]) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await self.endpoint(scope, receive, send)


class Gateway:
    """The gateway's routes and lifespan, for `create_app` or a host app to mount."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.decoder = FRAME_DECODERS[self.settings.payload_policy]
        self.routes: list[BaseRoute] = [
            Route("/register", self.register, methods=["POST", "DELETE"]),
            Route("/health", self.health, methods=["GET"]),
            WebSocketRoute("/gateway", AsgiEndpoint(self.gateway_ws)),
        ]
        self._hub: Hub | None = None
        self._registry: Registry | None = None
        self._hasher: Hasher | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Open the registry, backplane and hub; on exit close every socket (1012) and persist."""
        backplane: Backplane
        if self.settings.redis_url:
            backplane = RedisBackplane(self.settings)
            self._registry = RedisRegistry(backplane)
        else:
            backplane = MemoryBackplane()
            self._registry = FileRegistry(self.settings.registry_path)
        hub = self._hub = Hub(self.settings, backplane)
        self._hasher = Hasher()
        await self._hasher.start()
        await backplane.start(hub)
        log.info("gateway ready (%s)", "Redis backplane" if self.settings.redis_url else self.settings.registry_path)
        try:
            yield
        finally:
            await hub.close_all(CLOSE_RESTART, "service restart")
            await backplane.stop()
            await self._registry.close()
            await self._hasher.close()
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

    async def _verify(self, secret: str, secret_hash: str) -> bool:
        assert self._hasher is not None
        return await self._hasher.verify(secret, secret_hash)

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
            return await self._register(request)
        except Reject as exc:
            return json_response({"error": exc.message}, exc.status)
        except BackplaneUnavailable:
            return json_response({"error": "backplane unavailable, retry later"}, 503)
        except OSError as exc:  # the registry file could not be written: nothing was acknowledged
            log.error("registry write failed: %s", exc)
            return json_response({"error": "registry could not be saved, retry later"}, 503)

    async def _register(self, request: Request) -> Response:
        admin = self._is_admin(request)
        if self.settings.gateway_admin_token is not None and not admin:
            raise Reject(401, "registration is closed: Authorization: Bearer <token> required")
        body: RegisterBody = await read_json(request, RegisterBody)
        for _ in range(3):  # compare-and-set: retry if another request changed the entry meanwhile
            current = await self.registry.get(body.mesh_id)
            if current is None or admin:
                secret_hash = await self._hash(body.new_secret or body.secret)
            elif not await self._verify(body.secret, current.secret_hash):
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

    async def _unregister(self, request: Request) -> Response:
        admin = self._is_admin(request)
        body: UnregisterBody = await read_json(request, UnregisterBody)
        current = await self.registry.get(body.mesh_id)
        if current is None:
            raise Reject(404, "unknown meshId")
        if not admin:
            if body.secret is None:
                raise Reject(400, "Object missing required field `secret`")
            if not await self._verify(body.secret, current.secret_hash):
                raise Reject(403, "wrong secret")
        if not await self.registry.delete(current):
            raise Reject(409, "meshId changed meanwhile, retry")
        await self.hub.backplane.notify(body.mesh_id, close=True)
        log.info("mesh %s unregistered", body.mesh_id)
        return json_response({"ok": True})

    async def health(self, request: Request) -> Response:
        hub = self.hub
        body: dict[str, Any] = {"ok": hub.healthy, "connected": len(hub.peers)}
        if self.settings.redis_url:
            body["clusterConnected"] = len(hub.meshes) if hub.healthy else None
        return json_response(body, 200 if hub.healthy else 503)

    # --- Endpoints: WebSocket ---

    async def gateway_ws(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """A raw ASGI endpoint: the relay path skips Starlette's WebSocket wrapper."""
        hub = self.hub
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        peer = Peer(send, self.settings)
        peer.auth_deadline = asyncio.get_running_loop().call_later(self.settings.auth_timeout_s, self._auth_timeout, peer)
        try:
            while True:
                message = await receive()
                if message["type"] != "websocket.receive":  # websocket.disconnect
                    return
                if peer.closing:
                    continue
                data = message.get("text")
                await self._handle(peer, data if data is not None else message.get("bytes") or b"", hub)
        except Exception:  # the one boundary per connection: a bug here closes this socket (1011), no other
            log.exception("mesh %s: connection failed", peer.mesh_id)
            peer.close(CLOSE_INTERNAL, "internal error")
            if peer.writer is not None:
                await asyncio.wait([peer.writer], timeout=2)
        finally:
            if peer.auth_deadline is not None:
                peer.auth_deadline.cancel()
            if peer.writer is not None:
                peer.writer.cancel()
            hub.forget(peer)

    async def _handle(self, peer: Peer, data: str | bytes, hub: Hub) -> None:
        """Size-check and decode one message, then authenticate or dispatch it."""
        size = utf8_size(data) if isinstance(data, str) else len(data)
        if size > self.settings.max_frame_bytes:
            if size > self.settings.ws_max_bytes:  # only reached when an embedding server allows more
                peer.close(CLOSE_TOO_BIG, "message too big", flush=False)
                return
            message = f"frame of {size} bytes exceeds MAX_FRAME_BYTES={self.settings.max_frame_bytes}"
            peer.send_frame(Error(message=message, code=FRAME_TOO_LARGE, id=frame_id_of(read_head(data))))
            return
        frame = decode_frame(data, self.decoder)
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
        try:
            if not hub.healthy:
                raise BackplaneUnavailable
            mesh = await self.registry.get(frame.mesh_id)
            valid = await self._verify(frame.secret, mesh.secret_hash if mesh else DUMMY_HASH)
            if mesh is not None and valid and is_legacy(mesh.secret_hash):  # the Node gateway's hash: upgrade it now
                upgraded = Mesh(mesh.mesh_id, mesh.name, await self._hash(frame.secret), mesh.created or time.time())
                try:
                    await self.registry.put(upgraded, expect=mesh)
                    log.info("mesh %s: secret hash upgraded", mesh.mesh_id)
                except OSError as exc:  # the old hash still works; the upgrade is retried next auth
                    log.error("mesh %s: secret hash upgrade not saved: %s", mesh.mesh_id, exc)
        except BackplaneUnavailable:  # no secret can be checked: send the node elsewhere
            peer.send_frame(AuthError(message="Service unavailable"))
            peer.close(CLOSE_TRY_AGAIN, "service unavailable")
            return
        if peer.closing:
            return  # closed meanwhile (gateway shutting down)
        if mesh is None or not valid:
            log.info("auth refused for %r", frame.mesh_id[:64])
            peer.send_frame(AuthError(message="Invalid credentials"))
            peer.close(CLOSE_POLICY, "invalid credentials")
            return
        peer.mesh_id, peer.name = mesh.mesh_id, mesh.name
        peer.participants, peer.public_rooms = frame.participants, frame.public_rooms
        await hub.attach(peer, AuthOk(mesh_id=mesh.mesh_id, name=mesh.name))
        log.info("mesh %s connected", mesh.mesh_id)

    def _auth_timeout(self, peer: Peer) -> None:
        if peer.mesh_id is None and not peer.closing:
            peer.send_frame(AuthError(message="Auth timeout"))
            peer.close(CLOSE_POLICY, "auth timeout")


def create_app(settings: Settings | None = None) -> Starlette:
    gateway = Gateway(settings)
    return Starlette(routes=gateway.routes, lifespan=gateway.lifespan)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How `python gateway.py` (and so the Procfile) runs uvicorn: the fastest stack
    that still applies write backpressure (websockets-sansio, uvloop, httptools)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "ws": "websockets-sansio",
        "loop": "uvloop",
        "http": "httptools",
        "ws_max_size": settings.ws_max_bytes,
        "ws_ping_interval": settings.ping_interval_s,
        "ws_ping_timeout": settings.ping_timeout_s,
        "ws_per_message_deflate": settings.ws_per_message_deflate,
        "timeout_graceful_shutdown": 5,
        "backlog": 4096,  # a restart's reconnect storm arrives at once
        "log_level": settings.log_level,
        "server_header": False,
    }


def main() -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(str(exc))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    uvicorn.run(create_app(settings), **uvicorn_options(settings))


if __name__ == "__main__":
    main()
