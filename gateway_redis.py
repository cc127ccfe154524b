"""Mesh Gateway's cluster mode: many processes behind one Redis (REDIS_URL).

`gateway.py` imports this module only when REDIS_URL is set; it is what crosses processes:
- RedisBackplane: presence in Redis hashes with a TTL, frames over pub/sub;
- RedisRegistry: the registry in one Redis hash, compare-and-set in Lua;
- RedisMailboxes: the offline mailboxes, one stream shared by every process.
All three share one RedisLink (client, health, error mapping).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

import msgspec
import redis.asyncio as redis
from msgspec import Struct

from gateway import (
    Arrival,
    BackplaneUnavailable,
    Hub,
    Mesh,
    MeshInfo,
    Presence,
    RegistryFull,
    Requeue,
    Settings,
    SqliteStore,
    Stats,
    StoreError,
    encoder,
    log,
    read_registry_file,
)


def redis_parts(settings: Settings) -> tuple[RedisBackplane, RedisRegistry, RedisMailboxes]:
    """The backplane, registry and mailboxes of a cluster process, on one Redis link."""
    link = RedisLink(settings.redis_url or "")
    return RedisBackplane(settings, link), RedisRegistry(settings, link), RedisMailboxes(settings, link)


class RedisLink:
    """One Redis client for the backplane, registry and mailboxes. `healthy` is the backplane
    listener's view (a session is up); `call` turns an outage into BackplaneUnavailable."""

    def __init__(self, url: str) -> None:
        # A bounded pool that waits for a free connection rather than failing under bursts.
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=32, timeout=2, socket_timeout=2, socket_connect_timeout=2
        )
        self.client = redis.Redis(connection_pool=pool)
        # The listener's own connection speaks RESP2: with RESP3 (redis-py's default) every pub/sub
        # message is a push, which redis-py formats into a debug string (a repr of the whole payload)
        # before the log level is looked at: 5% of a cluster process's CPU under relay load (perf).
        self.subscriber = redis.Redis.from_url(url, protocol=2, socket_timeout=2, socket_connect_timeout=2)
        self.errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self.up = asyncio.Event()  # set while healthy

    @property
    def healthy(self) -> bool:
        return self.up.is_set()

    def set_healthy(self, healthy: bool) -> None:
        if healthy:
            self.up.set()
        else:
            self.up.clear()

    async def call(self, command: Awaitable[Any]) -> Any:
        """Await a Redis command; an outage becomes BackplaneUnavailable."""
        if not self.healthy:
            raise BackplaneUnavailable
        try:
            return await command
        except self.errors as exc:
            log.warning("backplane command failed: %r", exc)
            raise BackplaneUnavailable from exc


# What processes tell each other on the bus channel and their own channels. Not tracked by the
# garbage collector (they hold no cycles): a batch decodes into hundreds of them.
class Bus(Struct, tag_field="k", gc=False):
    pass


class BusRelay(Bus, tag="relay"):
    mesh_id: str
    frame: msgspec.Raw


class BusBroadcast(Bus, tag="broadcast"):
    node: str
    sender: str
    frame: msgspec.Raw


class BusPresence(Bus, tag="presence"):
    presence: Presence


class BusLeave(Bus, tag="leave"):
    mesh_id: str
    conn: str


class BusChanged(Bus, tag="changed"):
    mesh_id: str
    name: str | None = None
    close: bool = False


BusItem = BusRelay | BusBroadcast | BusPresence | BusLeave | BusChanged


class BusBatch(Bus, tag="batch"):
    """What one PUBLISH carries: every message for its channel queued in one drain turn, in order."""

    items: list[BusItem]


# A single message (not in a batch) is what processes sent before batching: still read.
bus_decoder = msgspec.json.Decoder(BusBatch | BusItem)
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
if current == '' and ARGV[3] ~= '' and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return -1 end
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

    def __init__(self, settings: Settings, link: RedisLink) -> None:
        self.link = link
        self.redis = link.client
        self.node = os.urandom(6).hex()
        self.ttl_ms = int(settings.presence_ttl_s * 1000)
        self.registry_path = settings.registry_path
        self.db_path = settings.db_path
        self.key = KEY_PRESENCE + self.node
        self.withdraw_script = self.redis.register_script(WITHDRAW_LUA)
        self.hub: Hub | None = None
        self.stats = Stats()  # the hub's, from start()
        self.task: asyncio.Task[None] | None = None
        self.outbox: list[tuple[str, BusItem, asyncio.Future[int]]] = []  # messages for the next pipeline
        self.drainer: asyncio.Task[None] | None = None
        self._imported = False

    @property
    def healthy(self) -> bool:
        return self.link.healthy

    async def start(self, hub: Hub) -> None:
        self.hub = hub
        self.stats = hub.stats
        self.task = asyncio.create_task(self._run())
        self.task.add_done_callback(self._died)
        up = asyncio.ensure_future(self.link.up.wait())
        # Serve anyway after 3 s: /health says 503 until Redis answers.
        await asyncio.wait([up, self.task], timeout=3, return_when=asyncio.FIRST_COMPLETED)
        up.cancel()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        with contextlib.suppress(*self.link.errors):
            await self.redis.delete(self.key)
            await self.redis.srem(KEY_NODES, self.node)
        await self.redis.aclose()
        await self.link.subscriber.aclose()

    def _died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.link.set_healthy(False)
            log.error("backplane listener died: %r; /health answers 503", task.exception())

    async def publish(self, presence: Presence) -> None:
        data = encoder.encode(presence)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.key, presence.mesh_id, data)
        pipe.pexpire(self.key, self.ttl_ms)
        pipe.sadd(KEY_NODES, self.node)
        pipe.publish(CHANNEL_BUS, encoder.encode(BusPresence(presence)))
        await self.link.call(pipe.execute())

    async def withdraw(self, presence: Presence) -> None:
        left = encoder.encode(BusLeave(mesh_id=presence.mesh_id, conn=presence.conn))
        await self.link.call(
            self.withdraw_script(keys=[self.key, CHANNEL_BUS], args=[presence.mesh_id, presence.conn, left])
        )

    def relay(self, node: str, mesh_id: str, frame: bytes) -> asyncio.Future[int]:
        return self._publish(CHANNEL_NODE + node, BusRelay(mesh_id=mesh_id, frame=msgspec.Raw(frame)))

    def broadcast(self, sender: str, frame: bytes) -> asyncio.Future[int]:
        return self._publish(CHANNEL_BUS, BusBroadcast(node=self.node, sender=sender, frame=msgspec.Raw(frame)))

    async def notify(self, mesh_id: str, *, name: str | None = None, close: bool = False) -> None:
        if not self.link.healthy:
            raise BackplaneUnavailable
        await self._publish(CHANNEL_BUS, BusChanged(mesh_id, name, close))

    def _publish(self, channel: str, message: BusItem) -> asyncio.Future[int]:
        """PUBLISH, batched: what every socket publishes meanwhile goes in one round trip, one
        PUBLISH per channel. The future holds how many processes received it (BackplaneUnavailable
        if Redis failed)."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.outbox.append((channel, message, future))
        self._wake()
        return future

    def _wake(self) -> None:
        if self.drainer is None:
            self.drainer = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self.outbox:
                batch, self.outbox = self.outbox, []
                groups = publish_groups(batch)
                pipe = self.redis.pipeline(transaction=False)
                for channel, items, _ in groups:
                    pipe.publish(channel, encoder.encode(BusBatch(items)))
                started = time.monotonic()
                try:
                    results = await pipe.execute()
                    self.stats.publish.observe(time.monotonic() - started)
                except self.link.errors as exc:
                    log.warning("backplane publish failed: %r", exc)
                    results = [BackplaneUnavailable()] * len(groups)
                for (*_, futures), result in zip(groups, results, strict=True):
                    for future in futures:
                        if future.done():
                            continue  # its sender went away
                        if isinstance(result, Exception):
                            future.set_exception(result)
                        else:  # a batch to a process that is gone (0) is not delivered: each sender keeps its frame
                            future.set_result(result)
        finally:
            self.drainer = None

    # --- the listener ---

    async def _run(self) -> None:
        while True:
            try:
                await self._session()
            except self.link.errors as exc:
                if self.link.healthy:
                    log.error(
                        "backplane down (%s): /health answers 503 until Redis is back",
                        exc,
                        extra={"event": "backplane_down"},
                    )
                self.link.set_healthy(False)
            await asyncio.sleep(self.RETRY_S)

    async def _session(self) -> None:
        pubsub = self.link.subscriber.pubsub()
        try:
            await pubsub.subscribe(CHANNEL_BUS, CHANNEL_NODE + self.node)
            if not self._imported:
                await import_into_redis(self.redis, self.registry_path, self.db_path)
                self._imported = True
            await self._announce_all()
            await self._resync()
            self.link.set_healthy(True)
            log.warning("backplane up: Redis answers (process %s)", self.node, extra={"event": "backplane_up"})
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
            with contextlib.suppress(*self.link.errors):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # untyped before redis-py 8.2

    def _receive(self, data: bytes) -> None:
        try:
            message = bus_decoder.decode(data)
        except msgspec.DecodeError as exc:
            log.error("unreadable backplane message: %s", exc)
            return
        for item in message.items if isinstance(message, BusBatch) else (message,):
            self._handle(item)

    def _handle(self, message: BusItem) -> None:
        assert self.hub is not None
        match message:
            case BusRelay(mesh_id=mesh_id, frame=frame):
                self.hub.deliver(mesh_id, bytes(frame))
            case BusBroadcast(node=node, sender=sender, frame=frame) if node != self.node:
                self.hub.fan_out(sender, bytes(frame))
            case BusPresence(presence=presence):
                self.hub.apply(presence)
            case BusLeave(mesh_id=mesh_id, conn=conn):
                self.hub.remove(mesh_id, conn)
            case BusChanged(mesh_id=mesh_id, name=name, close=close):
                self.hub.changed(mesh_id, name=name, close=close)

    async def _announce_all(self) -> None:
        """(Re)write this process's presence: Redis may have restarted empty."""
        assert self.hub is not None
        local = self.hub.local_presences()
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self.key)
        if local:
            pipe.hset(self.key, mapping={p.mesh_id: encoder.encode(p) for p in local})
            pipe.pexpire(self.key, self.ttl_ms)
        pipe.sadd(KEY_NODES, self.node)
        for presence in local:
            pipe.publish(CHANNEL_BUS, encoder.encode(BusPresence(presence)))
        await pipe.execute()

    async def _heartbeat(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.pexpire(self.key, self.ttl_ms)
        pipe.sadd(KEY_NODES, self.node)
        await pipe.execute()

    async def _resync(self) -> None:
        """Read every process's presence; a process whose hash expired is dead."""
        assert self.hub is not None
        nodes = [n.decode() if isinstance(n, bytes) else n for n in await self.redis.smembers(KEY_NODES)]
        pipe = self.redis.pipeline(transaction=False)
        for node in nodes:
            pipe.hgetall(KEY_PRESENCE + node)
        remote: dict[str, Presence] = {}
        dead = []
        for node, entries in zip(nodes, await pipe.execute(), strict=True):
            if not entries and node != self.node:
                dead.append(node)
            for raw in entries.values() if node != self.node else ():
                presence = presence_decoder.decode(raw)
                seen = remote.get(presence.mesh_id)
                if seen is None or seen.claimed_ns < presence.claimed_ns:
                    remote[presence.mesh_id] = presence
        if dead:
            await self.redis.srem(KEY_NODES, *dead)
        self.hub.resync(remote)


Group = tuple[str, list[BusItem], list[asyncio.Future[int]]]  # a channel, its messages, their senders' futures
BATCH_BYTES = 1 << 20  # frames per PUBLISH, at most (past it, another PUBLISH): the receiver decodes one in one go


def publish_groups(batch: list[tuple[str, BusItem, asyncio.Future[int]]]) -> list[Group]:
    """One PUBLISH per channel for a drain turn's messages, without reordering what one process
    receives: a bus message (every process gets it) closes the open groups of process channels,
    and a message to a process channel closes the open bus group. Relays to different processes
    go to different meshes, so their groups may be published in any order."""
    groups: dict[str, Group] = {}
    sizes: dict[str, int] = {}
    done: list[Group] = []
    for channel, message, future in batch:
        if groups and (channel == CHANNEL_BUS) != (CHANNEL_BUS in groups):
            done += groups.values()
            groups, sizes = {}, {}
        size = len(message.frame) if isinstance(message, BusRelay | BusBroadcast) else 0
        group = groups.get(channel)
        if group is None or (sizes[channel] + size > BATCH_BYTES and group[1]):
            if group is not None:  # full: published before the channel's next group
                done.append(group)
            group = groups[channel] = (channel, [], [])
            sizes[channel] = 0
        sizes[channel] += size
        group[1].append(message)
        group[2].append(future)
    done += groups.values()
    return done


async def import_into_redis(client: Any, registry_path: str, db_path: str) -> None:
    """Moving from one process to many: add the meshes of the registry file and of an existing
    database that Redis lacks, once per content (a deleted mesh is never brought back)."""
    for source, read in ((registry_path, read_registry_file), (db_path, read_database_registry)):
        try:
            meshes, digest = await asyncio.to_thread(read, source)
        except FileNotFoundError:
            continue
        if await client.sismember(KEY_IMPORTED, digest):
            continue
        pipe = client.pipeline(transaction=False)
        for mesh in meshes:
            pipe.hsetnx(KEY_REGISTRY, mesh.mesh_id, encoder.encode(mesh))
        added = sum(await pipe.execute())
        await client.sadd(KEY_IMPORTED, digest)
        log.info("imported %d of %d meshes from %s into Redis", added, len(meshes), source)


def read_database_registry(path: str) -> tuple[list[Mesh], str]:
    """The registry of a single-process gateway's database (read only), and a digest of it."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT mesh_id, name, secret_hash, created FROM meshes ORDER BY mesh_id").fetchall()
    meshes = [Mesh(*row) for row in rows]
    return meshes, hashlib.sha256(encoder.encode(meshes)).hexdigest()


class RedisRegistry:
    """The registry in one Redis hash; writes are compare-and-set (Lua), so two
    processes registering the same id at once cannot both win."""

    def __init__(self, settings: Settings, link: RedisLink) -> None:
        self.link = link
        self.redis = link.client
        self.max_meshes = settings.max_meshes
        self.cas = self.redis.register_script(CAS_LUA)

    async def get(self, mesh_id: str) -> Mesh | None:
        raw = await self.link.call(self.redis.hget(KEY_REGISTRY, mesh_id))
        return None if raw is None else msgspec.json.decode(raw, type=Mesh)

    async def put(self, mesh: Mesh, *, expect: Mesh | None) -> bool:
        return await self._swap(mesh.mesh_id, expect, encoder.encode(mesh))

    async def delete(self, mesh: Mesh) -> bool:
        if not await self._swap(mesh.mesh_id, mesh, b""):
            return False
        pipe = self.redis.pipeline(transaction=True)  # its mailbox goes with it
        for key in (KEY_AWAY, KEY_SEEN, KEY_CATCHING, KEY_COUNT, KEY_DROPPED):
            pipe.hdel(key, mesh.mesh_id)
        await self.link.call(pipe.execute())
        return True

    async def close(self) -> None:
        pass

    async def listing(self, *, after: str, limit: int) -> list[MeshInfo]:
        redis = self.redis
        pipe = redis.pipeline(transaction=False)
        for key in (KEY_REGISTRY, KEY_SEEN, KEY_COUNT):
            pipe.hgetall(key)
        entries, seen, counts = await self.link.call(pipe.execute())
        meshes = sorted((msgspec.json.decode(raw, type=Mesh) for raw in entries.values()), key=lambda m: m.mesh_id)
        chosen = [m for m in meshes if m.mesh_id > after][:limit]
        return [
            MeshInfo(
                m.mesh_id,
                m.name,
                m.created,
                float(seen[k]) if (k := m.mesh_id.encode()) in seen else None,
                int(counts.get(k, 0)),
            )
            for m in chosen
        ]

    async def _swap(self, mesh_id: str, expect: Mesh | None, new: bytes) -> bool:
        old = b"" if expect is None else encoder.encode(expect)
        done = await self.link.call(self.cas(keys=[KEY_REGISTRY], args=[mesh_id, old, new, self.max_meshes]))
        if done == -1:
            raise RegistryFull
        return bool(done)


# Offline mailboxes in Redis: one stream `mesh:log` whose entry ids are a global sequence
# (`<seq>-0`), so relays and broadcasts keep one order; each away mesh has a cursor in it.
KEY_SEQ = "mesh:seq"  # the last kept frame's sequence number
KEY_LOG = "mesh:log"  # stream of kept frames: t (target, "" = broadcast), s (sender), a (time), f (frame)
KEY_AWAY = "mesh:away"  # hash meshId -> cursor: the away meshes
KEY_SEEN = "mesh:seen"  # hash meshId -> last connected (epoch s)
KEY_CATCHING = "mesh:catching"  # hash meshId -> cursor: meshes reading their mailbox now
KEY_COUNT = "mesh:count"  # hash meshId -> frames kept for it
KEY_DROPPED = "mesh:dropped"  # hash meshId -> frames dropped past OFFLINE_MAX_MESSAGES, told on next auth
KEY_BYTES = "mesh:bytes"  # bytes in the stream
MAILBOX_KEYS = [KEY_SEQ, KEY_LOG, KEY_AWAY, KEY_SEEN, KEY_CATCHING, KEY_COUNT, KEY_DROPPED, KEY_BYTES]

# Keep one frame for the away receivers it has: ARGV target ("" = broadcast), sender, now, ttl, frame, max.
KEEP_LUA = """
local target, sender, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local frame, max = ARGV[5], tonumber(ARGV[6])
local receivers = {}
if target ~= '' then
  local seen = tonumber(redis.call('HGET', KEYS[4], target))
  if not seen or seen <= now - ttl then return 0 end
  if not redis.call('HGET', KEYS[3], target) then  -- its process is gone: away from now on
    redis.call('HSET', KEYS[3], target, redis.call('GET', KEYS[1]) or 0)
  end
  receivers = {target}
else
  for _, m in ipairs(redis.call('HKEYS', KEYS[3])) do
    local seen = tonumber(redis.call('HGET', KEYS[4], m))
    if m ~= sender and seen and seen > now - ttl then table.insert(receivers, m) end
  end
  if #receivers == 0 then return 0 end
end
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], seq .. '-0', 't', target, 's', sender, 'a', ARGV[3], 'f', frame)
redis.call('INCRBY', KEYS[8], #frame)
for _, m in ipairs(receivers) do
  if redis.call('HINCRBY', KEYS[6], m, 1) > max then redis.call('HINCRBY', KEYS[7], m, 1) end
end
return #receivers
"""
# A mesh authenticated: ARGV mesh, now. Returns {cursor, end, count, dropped}.
ARRIVE_LUA = """
local m = ARGV[1]
local last = tonumber(redis.call('GET', KEYS[1]) or 0)
local cursor = tonumber(redis.call('HGET', KEYS[3], m) or last)
local count = tonumber(redis.call('HGET', KEYS[6], m) or 0)
local dropped = tonumber(redis.call('HGET', KEYS[7], m) or 0)
redis.call('HDEL', KEYS[3], m)
redis.call('HDEL', KEYS[6], m)
redis.call('HDEL', KEYS[7], m)
redis.call('HSET', KEYS[5], m, cursor)
redis.call('HSET', KEYS[4], m, ARGV[2])
return {cursor, last, count, dropped}
"""
# Append frames for one mesh: ARGV mesh, now, frames... Returns the last sequence number.
APPEND_LUA = """
local seq = 0
for i = 3, #ARGV do
  seq = redis.call('INCR', KEYS[1])
  redis.call('XADD', KEYS[2], seq .. '-0', 't', ARGV[1], 's', '', 'a', ARGV[2], 'f', ARGV[i])
  redis.call('INCRBY', KEYS[8], #ARGV[i])
end
return seq
"""
# A mesh whose process died is away from now on, unless it is back somewhere already.
LOST_LUA = """
if redis.call('HEXISTS', KEYS[5], ARGV[1]) == 0 then
  redis.call('HSETNX', KEYS[3], ARGV[1], redis.call('GET', KEYS[1]) or 0)
end
"""


class RedisMailboxes:
    """The Mailboxes of a cluster, in Redis, shared by every process: a mesh that left
    one process and authenticates through another finds its mailbox there."""

    def __init__(self, settings: Settings, link: RedisLink) -> None:
        self.link = link
        self.redis = link.client
        self.ttl = settings.offline_ttl_s
        self.max_messages = settings.offline_max_messages
        self.max_bytes = settings.offline_max_bytes
        self.readers: set[str] = set()  # refreshed each second, and on every local leave
        self.queued = 0
        self.keep_script = self.redis.register_script(KEEP_LUA)
        self.arrive_script = self.redis.register_script(ARRIVE_LUA)
        self.append_script = self.redis.register_script(APPEND_LUA)
        self.lost_script = self.redis.register_script(LOST_LUA)
        self.refresh_s = min(1.0, self.ttl / 4)
        self.dropped = self.expired = 0
        self.seen_written = 0.0
        self.keeping: list[tuple[list[str | bytes | float], asyncio.Future[int]]] = []  # for the next pipeline
        self.keeper: asyncio.Task[None] | None = None

    def _future(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        return asyncio.ensure_future(coroutine)

    async def _call(self, command: Awaitable[Any]) -> Any:
        """Redis errors become StoreError (an outage is answered, never silent)."""
        try:
            return await self.link.call(command)
        except BackplaneUnavailable as exc:
            raise StoreError("Redis unavailable") from exc

    def keep(self, sender: str, target: str | None, frame: bytes) -> asyncio.Future[int]:
        """Kept in the order asked, pipelined: one script call each on one connection (concurrent calls
        on pooled connections reached Redis out of order, e.g. a burst of relays to a process that died)."""
        args: list[str | bytes | float] = [target or "", sender, time.time(), self.ttl, frame, self.max_messages]
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.keeping.append((args, future))
        if self.keeper is None:
            self.keeper = asyncio.create_task(self._keep_all())
        return future

    async def _keep_all(self) -> None:
        try:
            while self.keeping:
                batch, self.keeping = self.keeping, []
                pipe = self.redis.pipeline(transaction=False)
                for args, _ in batch:
                    await self.keep_script(keys=MAILBOX_KEYS, args=args, client=pipe)  # queued in the pipeline
                try:
                    results = await self._call(pipe.execute(raise_on_error=False))
                except StoreError as exc:
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(StoreError(f"Redis: {result}"))
                    else:
                        future.set_result(result)
        finally:
            self.keeper = None

    def arrive(self, mesh_id: str, requeue: Requeue | None) -> asyncio.Future[Arrival]:
        self.readers.discard(mesh_id)
        return self._future(self._arrive(mesh_id, requeue))

    async def _arrive(self, mesh_id: str, requeue: Requeue | None) -> Arrival:
        if requeue is not None:
            await self._leave(mesh_id, requeue)
        cursor, end, count, dropped = await self._call(
            self.arrive_script(keys=MAILBOX_KEYS, args=[mesh_id, time.time()])
        )
        skip = max(0, count - self.max_messages)  # past OFFLINE_MAX_MESSAGES the oldest go
        if skip:
            self.dropped += skip
            log.warning("mesh %s: mailbox full, dropped its %d oldest kept frames", mesh_id, skip)
            skipped = await self._read(mesh_id, cursor, end, skip)
            cursor = skipped[-1][0] if skipped else cursor
            await self._call(self.redis.hset(KEY_CATCHING, mesh_id, cursor))
        return Arrival(cursor=cursor, end=end, dropped=dropped)

    def read(self, mesh_id: str, after: int, end: int, limit: int) -> asyncio.Future[list[tuple[int, bytes]]]:
        return self._future(self._read(mesh_id, after, end, limit))

    async def _read(self, mesh_id: str, after: int, end: int, limit: int) -> list[tuple[int, bytes]]:
        """Scan the shared log after `after` for this mesh's frames (others' are skipped)."""
        found: list[tuple[int, bytes]] = []
        since = time.time() - self.ttl
        start = after + 1
        target = mesh_id.encode()
        while len(found) < limit:
            entries = await self._call(self.redis.xrange(KEY_LOG, min=f"{start}-0", count=max(limit, 512)))
            for entry_id, fields in entries:
                seq = int(entry_id.split(b"-")[0])
                mine = fields[b"t"] == target or (fields[b"t"] == b"" and fields[b"s"] != target and seq <= end)
                if mine and float(fields[b"a"]) >= since:
                    found.append((seq, fields[b"f"]))
                    if len(found) == limit:
                        break
                start = seq + 1
            if len(entries) < max(limit, 512):
                break
        return found

    def spill(self, mesh_id: str, frames: list[bytes]) -> asyncio.Future[None]:
        return self._future(self._call(self.append_script(keys=MAILBOX_KEYS, args=[mesh_id, time.time(), *frames])))

    def confirm(self, mesh_id: str, seq: int, *, count: int = 0, caught_up: bool = False) -> asyncio.Future[None]:
        command = self.redis.hdel(KEY_CATCHING, mesh_id) if caught_up else self.redis.hset(KEY_CATCHING, mesh_id, seq)
        return self._future(self._call(command))

    def leave(self, mesh_id: str, requeue: Requeue) -> asyncio.Future[None]:
        self.readers.add(mesh_id)
        return self._future(self._leave(mesh_id, requeue))

    async def _leave(self, mesh_id: str, requeue: Requeue) -> None:
        if not await self._call(self.redis.hexists(KEY_REGISTRY, mesh_id)):
            return  # unregistered meanwhile: its mailbox is gone
        now = time.time()
        if await self._call(self.redis.hexists(KEY_AWAY, mesh_id)):
            frames = [*requeue.held, *requeue.backlog]
            count = await self._call(self.redis.hget(KEY_COUNT, mesh_id)) or 0
        else:  # what it held, then what it had not read, then what waited behind, after a new cursor
            catching = await self._call(self.redis.hexists(KEY_CATCHING, mesh_id))
            cursor = int(await self._call(self.redis.get(KEY_SEQ)) or 0)
            unread = await self._read(mesh_id, requeue.read, requeue.end, self.max_messages) if catching else []
            frames = [*requeue.held, *(frame for _, frame in unread), *requeue.backlog]
            await self._call(self.redis.hset(KEY_AWAY, mesh_id, cursor))
            count = 0
        if frames:
            await self._call(self.append_script(keys=MAILBOX_KEYS, args=[mesh_id, now, *frames]))
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(KEY_CATCHING, mesh_id)
        pipe.hset(KEY_COUNT, mesh_id, int(count) + len(frames))
        pipe.hset(KEY_SEEN, mesh_id, now)
        await self._call(pipe.execute())

    def refresh(self, live: list[str]) -> asyncio.Future[list[str]]:
        return self._future(self._refresh(live))

    async def _refresh(self, live: list[str]) -> list[str]:
        """Live meshes seen now; meshes away past the TTL expire; frames no one reads go."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        if live and now - self.seen_written >= SqliteStore.CHECK_EVERY_S:  # last-seen needs no finer grain
            pipe.hset(KEY_SEEN, mapping={m: now for m in live})
            self.seen_written = now
        pipe.hgetall(KEY_AWAY)
        pipe.hgetall(KEY_SEEN)
        pipe.hvals(KEY_CATCHING)
        pipe.hgetall(KEY_COUNT)
        *_, away, seen, catching, counts = await self._call(pipe.execute())
        expired = [m.decode() for m in away if float(seen.get(m, 0)) <= now - self.ttl]
        if expired:
            await self._call(self.redis.hdel(KEY_AWAY, *expired))
        cursors = [int(c) for m, c in away.items() if m.decode() not in expired] + [int(c) for c in catching]
        floor = min(cursors) if cursors else int(await self._call(self.redis.get(KEY_SEQ)) or 0)
        await self._call(self.redis.xtrim(KEY_LOG, minid=f"{floor + 1}-0"))
        await self._trim_bytes()
        self.readers = {m.decode() for m in away} - set(expired)
        self.queued = sum(int(counts.get(m.encode(), 0)) for m in self.readers)
        return expired

    async def lost(self, mesh_id: str) -> None:
        """A mesh's process died (its presence expired): it is away from now on."""
        self.readers.add(mesh_id)
        await self._call(self.lost_script(keys=MAILBOX_KEYS, args=[mesh_id]))

    async def _trim_bytes(self) -> None:
        """Past OFFLINE_MAX_BYTES the oldest kept frames go (in a cluster, from the whole log)."""
        while int(await self._call(self.redis.get(KEY_BYTES)) or 0) > self.max_bytes:
            oldest = await self._call(self.redis.xrange(KEY_LOG, count=64))
            if not oldest:
                await self._call(self.redis.set(KEY_BYTES, 0))
                return
            pipe = self.redis.pipeline(transaction=True)
            pipe.xdel(KEY_LOG, *(entry_id for entry_id, _ in oldest))
            pipe.decrby(KEY_BYTES, sum(len(fields[b"f"]) for _, fields in oldest))
            for _, fields in oldest:
                if fields[b"t"]:
                    pipe.hincrby(KEY_DROPPED, fields[b"t"], 1)
            await self._call(pipe.execute())
            log.warning("kept frames past OFFLINE_MAX_BYTES: dropped the %d oldest", len(oldest))
