"""Mesh Gateway tests, ordered like the layers of gateway.py:
settings and protocol (no I/O) -> registry and store -> dispatcher with an in-memory hub ->
HTTP and WebSocket through a real uvicorn server -> whole processes.
Shared helpers and fixtures: conftest.py. The cluster (three processes, one Redis): test_cluster.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import gc
import hashlib
import json
import math
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import unittest.mock
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
import websockets
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Mount

import gateway as gw
from conftest import (
    FIXTURE,
    HERE,
    MESSAGE,
    TIMEOUT,
    FreezableProxy,
    Gate,
    Node,
    RawNode,
    away,
    contents,
    free_port,
    kept_rows,
    make_settings,
    offline_settings,
    process,
    relay_all,
    returning,
    running,
    stored_meshes,
)
from gateway import Settings

# --- Settings ---------------------------------------------------------------------------------


def test_settings_defaults_match_protocol() -> None:
    s = Settings.from_env({})
    assert (s.port, s.host, s.registry_path, s.redis_url) == (4000, "0.0.0.0", "registry.json", None)
    assert (s.rate_limit_per_min, s.max_frame_bytes, s.ws_max_bytes, s.send_buffer_bytes) == (
        60,
        10240,
        1048576,
        1048576,
    )
    assert (s.auth_timeout_s, s.ping_interval_s, s.ping_timeout_s, s.presence_ttl_s) == (10, 20, 20, 10)
    assert (s.payload_policy, s.log_level, s.gateway_admin_token, s.ws_per_message_deflate) == (
        "mesh",
        "info",
        None,
        False,
    )
    assert (s.db_path, s.offline_ttl_s, s.offline_max_messages, s.offline_max_bytes) == (
        "gateway.db",
        86400,
        10000,
        268435456,
    )
    assert s.confirm_interval_s == 1
    assert Settings.from_env({"OFFLINE_TTL_S": "0"}).offline_ttl_s == 0  # off


def test_settings_convert_strings() -> None:
    s = Settings.from_env({"PORT": "8080", "PING_TIMEOUT_S": "2.5", "PAYLOAD_POLICY": "PASSTHROUGH", "REDIS_URL": ""})
    assert (s.port, s.ping_timeout_s, s.payload_policy, s.redis_url) == (8080, 2.5, "passthrough", None)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RATE_LIMIT_PER_MIN": "abc"}, "RATE_LIMIT_PER_MIN='abc'"),
        ({"MAX_FRAME_BYTES": "0"}, "MAX_FRAME_BYTES='0'"),
        ({"AUTH_TIMEOUT_S": "-1"}, "AUTH_TIMEOUT_S='-1'"),
        ({"PAYLOAD_POLICY": "open"}, "PAYLOAD_POLICY='open'"),
        ({"SEND_BUFFER_BYTES": "1e"}, "SEND_BUFFER_BYTES='1e'"),
        ({"WS_MAX_BYTES": "1000"}, "WS_MAX_BYTES=1000"),
        ({"OFFLINE_TTL_S": "-1"}, "OFFLINE_TTL_S='-1'"),
        ({"OFFLINE_MAX_MESSAGES": "0"}, "OFFLINE_MAX_MESSAGES='0'"),
        ({"OFFLINE_MAX_BYTES": "lots"}, "OFFLINE_MAX_BYTES='lots'"),
        ({"CONFIRM_INTERVAL_S": "0"}, "CONFIRM_INTERVAL_S='0'"),
    ],
)
def test_settings_reject_bad_values(env: dict[str, str], needle: str) -> None:
    with pytest.raises(gw.SettingsError) as info:
        Settings.from_env(env)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


# --- Protocol ---------------------------------------------------------------------------------


def test_client_frames_decode_to_structs() -> None:
    frame = gw.FRAME_DECODERS["passthrough"].decode(
        b'{"type":"gateway_auth","meshId":"a","secret":"s","participants":[{"id":"1","name":"x","type":"user"}],"future":1}'
    )
    assert frame == gw.Auth(mesh_id="a", secret="s", participants=[gw.Participant("1", "x", "user")])
    assert gw.FRAME_DECODERS["passthrough"].decode('{"type":"gateway_discover"}') == gw.Discover()
    relay = gw.FRAME_DECODERS["passthrough"].decode(
        '{"type":"gateway_relay","targetMeshId":"b","payload":{"k":1},"id":"7"}'
    )
    assert relay == gw.Relay(target_mesh_id="b", payload={"k": 1}, id="7")
    relay = gw.FRAME_DECODERS["mesh"].decode('{"type":"gateway_relay","targetMeshId":"b","payload":{"k":1,"type":"t"}}')
    assert relay == gw.Relay(target_mesh_id="b", payload=gw.MeshPayload(type="t"))
    assert gw.FRAME_DECODERS["passthrough"].decode(
        '{"type":"gateway_update_rooms","publicRooms":["x"]}'
    ) == gw.UpdateRooms(["x"])


def test_server_frames_encode_wire_names() -> None:
    assert json.loads(gw.encoder.encode(gw.AuthOk(mesh_id="a", name="A"))) == {
        "type": "gateway_auth_ok",
        "meshId": "a",
        "name": "A",
    }
    group = gw.ParticipantGroup(mesh_id="a", mesh_name="A", participants=[])
    assert json.loads(gw.encoder.encode(gw.Participants(remote_participants=[group]))) == {
        "type": "gateway_participants",
        "remoteParticipants": [{"meshId": "a", "meshName": "A", "participants": []}],
    }
    error = gw.Error(message="m", code=gw.TARGET_OFFLINE, id="1", target_mesh_id="b")
    assert json.loads(gw.encoder.encode(error)) == {
        "type": "error",
        "message": "m",
        "code": "target_offline",
        "id": "1",
        "targetMeshId": "b",
    }


BAD_FRAMES = [
    ("not json", gw.INVALID_JSON, None),
    (b"\xff\xfe{", gw.INVALID_JSON, None),
    ('{"type":"gateway_relay","targetMeshId":"b","payload":"\xff"}'.encode("latin-1"), gw.INVALID_JSON, None),
    ("[1,2]", gw.INVALID_FRAME, "object"),
    ('"gateway_discover"', gw.INVALID_FRAME, "object"),
    ("{}", gw.INVALID_FRAME, "`type`"),
    ('{"type":5}', gw.INVALID_FRAME, "$.type"),
    ('{"type":"gateway_nope"}', gw.UNKNOWN_TYPE, "gateway_nope"),
    ('{"type":"gateway_relay","targetMeshId":"b","payload":null,"id":"x1"}', gw.INVALID_FRAME, "$.payload"),
    ('{"type":"gateway_relay","targetMeshId":5,"payload":{}}', gw.INVALID_FRAME, "$.targetMeshId"),
    ('{"type":"gateway_relay","payload":{}}', gw.INVALID_FRAME, "targetMeshId"),
    ('{"type":"gateway_broadcast","payload":[],"id":"x2"}', gw.INVALID_FRAME, "$.payload"),
    ('{"type":"gateway_broadcast","payload":{},"id":"' + "x" * 65 + '"}', gw.INVALID_FRAME, "$.id"),
    ('{"type":"gateway_auth","meshId":1,"secret":"s"}', gw.INVALID_FRAME, "$.meshId"),
    ('{"type":"gateway_update_participants","participants":[{"id":1}]}', gw.INVALID_FRAME, "$.participants[0]"),
    ('{"type":"gateway_update_rooms","publicRooms":"general"}', gw.INVALID_FRAME, "$.publicRooms"),
]


@pytest.mark.parametrize(("data", "code", "needle"), BAD_FRAMES)
def test_bad_frames_are_classified(data: str | bytes, code: str, needle: str | None) -> None:
    error = gw.decode_frame(data)
    assert isinstance(error, gw.Error)
    assert error.code == code
    if needle:
        assert needle in error.message


def test_decode_error_carries_valid_id_only() -> None:
    error = gw.decode_frame('{"type":"gateway_relay","payload":null,"id":"abc"}')
    assert isinstance(error, gw.Error) and error.id == "abc"
    error = gw.decode_frame('{"type":"gateway_relay","payload":null,"id":"' + "y" * 65 + '"}')
    assert isinstance(error, gw.Error) and error.id is None


SANITIZED = {
    "type": "new_message",
    "message": {
        "id": "m1",
        "roomId": "r1",
        "senderId": "u1",
        "senderName": "alice",
        "content": "hello",
        "isDm": False,
        "createdAt": "2026-11-28T00:00:00.000Z",
        "roomName": "general",
        "trustLevel": "federated",
    },
}


def mesh_payload(payload: Any) -> gw.MeshPayload:
    """`payload` as the gateway decodes it under the default policy."""
    return gw.FRAME_DECODERS["mesh"].decode(json.dumps({"type": "gateway_broadcast", "payload": payload})).payload


def mesh_policy(payload: Any) -> Any:
    return json.loads(gw.encoder.encode(gw.federate(mesh_payload(payload))))


def test_mesh_policy_keeps_whitelist_and_forces_federated() -> None:
    assert mesh_policy(MESSAGE) == SANITIZED
    assert mesh_policy({"type": "x", "message": "plain"}) == {"type": "x", "message": "plain"}
    assert mesh_policy({"type": "x", "message": {}}) == {"type": "x", "message": {"trustLevel": "federated"}}
    assert mesh_policy({"other": 1}) == {}
    nested = {"message": {"content": {"rich": [1, {"b": None}]}, "trustLevel": "admin"}}
    assert mesh_policy(nested) == {"message": {"content": {"rich": [1, {"b": None}]}, "trustLevel": "federated"}}


def test_token_bucket_bursts_then_limits() -> None:
    bucket = gw.TokenBucket(60)
    assert all(bucket.take() == 0 for _ in range(60))
    wait_ms = bucket.take()
    assert 0 < wait_ms <= 1000


# --- Registry and store (the SQLite database, the hashing processes) --------------------------


def test_secret_hash_is_salted_and_verifies() -> None:
    first, second = gw.hash_secret("correct horse"), gw.hash_secret("correct horse")
    assert first != second and "correct horse" not in first
    assert gw.verify_secret("correct horse", first)
    assert not gw.verify_secret("wrong horse", first)
    legacy = "a" * 0 + hashlib.sha256(b"node secret").hexdigest()
    assert gw.is_legacy(legacy) and gw.verify_secret("node secret", legacy)
    assert not gw.verify_secret("other", legacy)
    assert not gw.verify_secret("x", "garbage$$")


@contextlib.asynccontextmanager
async def opened_store(folder: Path, **overrides: Any) -> AsyncIterator[gw.SqliteStore]:
    store = gw.SqliteStore(make_settings(folder, **overrides))
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def test_a_big_store_batch_resolves_in_order_a_few_futures_a_turn(tmp_path: Path) -> None:
    async with opened_store(tmp_path) as store:
        loop = asyncio.get_running_loop()
        turn = 0  # loop turns so far
        resolved: list[tuple[int, int]] = []  # (turn, value)

        def count_turns() -> None:
            nonlocal turn
            turn += 1
            if len(resolved) < 300:
                loop.call_soon(count_turns)

        count_turns()
        gate = threading.Event()
        held = store.call(lambda: gate.wait(TIMEOUT))  # the writer thread waits, so the 300 form one batch
        futures = [store.call(lambda n=n: n) for n in range(300)]
        for future in futures:
            future.add_done_callback(lambda done: resolved.append((turn, done.result())))
        gate.set()
        await asyncio.gather(held, *futures)
        assert [value for _, value in resolved] == list(range(300))  # every one, in order
        per_turn = collections.Counter(t for t, _ in resolved)
        assert max(per_turn.values()) <= gw.SETTLE_PER_TURN  # never all in one turn


async def test_store_registry_compare_and_set(tmp_path: Path) -> None:
    async with opened_store(tmp_path) as registry:
        mesh = gw.Mesh("a", "A", gw.hash_secret("secret-a"), 1.0)
        assert await registry.put(mesh, expect=None)
        assert not await registry.put(gw.Mesh("a", "Thief", "x", 2.0), expect=None)
        renamed = gw.Mesh("a", "A2", mesh.secret_hash, 1.0)
        assert await registry.put(renamed, expect=mesh)
        assert not await registry.delete(mesh)
    async with opened_store(tmp_path) as reloaded:
        assert await reloaded.get("a") == renamed
        assert await reloaded.delete(renamed)
    async with opened_store(tmp_path) as reloaded:
        assert await reloaded.get("a") is None


async def test_store_groups_concurrent_writes_in_one_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []
    real = gw.SqliteStore._run

    def counting(self: gw.SqliteStore, batch: list[Any]) -> Any:
        batches.append(len(batch))
        return real(self, batch)

    monkeypatch.setattr(gw.SqliteStore, "_run", counting)
    async with opened_store(tmp_path) as registry:
        batches.clear()
        meshes = [gw.Mesh(f"m{i}", "M", "h", 1.0) for i in range(200)]
        assert all(await asyncio.gather(*(registry.put(m, expect=None) for m in meshes)))
    assert sum(batches) == 200 and len(batches) < 20  # one commit per group, not per registration
    assert len(stored_meshes(tmp_path)) == 200


def test_registry_file_formats(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"node-secret").hexdigest()
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"meshId": "a", "secretHash": digest, "name": "A"}]))
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"a": {"secretHash": digest, "name": "A"}}))
    for path in (listed, keyed):
        assert gw.read_registry_file(str(path))[0] == [gw.Mesh("a", "A", digest)]
    # our earlier format: a snapshot and a journal whose torn last line was never acknowledged
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps([{"meshId": "m0", "name": "M", "secretHash": "h", "created": 1.0}]))
    (tmp_path / "ours.json.journal").write_bytes(
        b'{"op":"put","mesh":{"meshId":"m1","name":"M","secretHash":"h"}}\n{"op":"delete","meshId":"m0"}\n'
        b'{"op":"put","mesh":{"meshId":"torn"'
    )
    assert [m.mesh_id for m in gw.read_registry_file(str(ours))[0]] == ["m1"]
    with open(tmp_path / "ours.json.journal", "ab") as journal:  # damage anywhere else is refused
        journal.write(b'\n{"op":"delete","meshId":"m1"}\n')
    with pytest.raises(RuntimeError, match="journal"):
        gw.read_registry_file(str(ours))


async def test_hashing_recovers_when_a_worker_dies() -> None:
    hasher = gw.Hasher(workers=1)
    try:
        await hasher.start()
        secret_hash = await hasher.hash("secret-1")
        for worker in hasher.workers:
            assert worker.process is not None
            worker.process.kill()
        with contextlib.suppress(gw.HasherGone):  # the batch that met the dead worker fails, promptly
            async with asyncio.timeout(TIMEOUT):
                await hasher.verify("secret-1", secret_hash)
        async with asyncio.timeout(TIMEOUT):
            assert await hasher.verify("secret-1", secret_hash)  # new workers took over
    finally:
        await hasher.close()


async def test_an_urgent_check_runs_on_the_loop_until_its_budget_is_spent() -> None:
    hasher = gw.Hasher(workers=1)  # never started: a check handed to a process would wait forever
    secret_hash = gw.hash_secret("secret-1")
    assert await hasher.verify("secret-1", secret_hash, urgent=True)
    assert not await hasher.verify("wrong", secret_hash, urgent=True)
    assert not hasher.jobs
    hasher.inline = gw.PerSecond(0)  # the budget spent (a storm): urgent checks queue for the processes
    waiting = [asyncio.ensure_future(hasher.verify("secret-1", secret_hash, urgent=urgent)) for urgent in (True, False)]
    await asyncio.sleep(0)
    assert len(hasher.jobs) == 2 and not any(task.done() for task in waiting)
    for task in waiting:
        task.cancel()


def test_throttle_calls_a_key_clean_until_it_fails_and_again_once_refilled(monkeypatch: pytest.MonkeyPatch) -> None:
    throttle = gw.Throttle(60)  # one token a second
    assert throttle.clean("mesh:a", "ip:1")
    throttle.take("mesh:a", "ip:1")
    assert not throttle.clean("mesh:a", "ip:2") and not throttle.clean("mesh:b", "ip:1")
    assert throttle.clean("mesh:b", "ip:2")
    later = gw.time.monotonic() + 2
    monkeypatch.setattr(gw.time, "monotonic", lambda: later)
    assert throttle.clean("mesh:a", "ip:1")


# --- Dispatcher (in-memory hub, no network) ---------------------------------------------------


class FakeSocket:
    """An ASGI `send` that collects what a Peer's writer sends."""

    def __init__(self) -> None:
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "websocket.close":
            await self.sent.put({"closed": message["code"], "reason": message["reason"]})
        else:
            await self.sent.put(json.loads(message["text"]))

    async def next(self) -> dict[str, Any]:
        async with asyncio.timeout(TIMEOUT):
            return await self.sent.get()


async def make_peer(
    hub: gw.Hub, mesh_id: str, participants: list[gw.Participant] | None = None
) -> tuple[gw.Peer, FakeSocket]:
    sock = FakeSocket()
    peer = gw.Peer(sock, hub.settings)  # type: ignore[arg-type]
    peer.mesh_id, peer.name, peer.participants = mesh_id, mesh_id.upper(), participants or []
    await hub.attach(peer, gw.AuthOk(mesh_id=mesh_id, name=peer.name))
    assert (await sock.next())["type"] == "gateway_auth_ok"
    return peer, sock


async def test_dispatch_relay_ack_and_offline() -> None:
    hub = gw.Hub(Settings(), gw.MemoryBackplane())
    a, sock_a = await make_peer(hub, "a")
    _b, sock_b = await make_peer(hub, "b")
    await gw.dispatch(a, gw.Relay(target_mesh_id="b", payload=mesh_payload(MESSAGE), id="1"), hub)
    incoming = await sock_b.next()
    assert incoming["type"] == "gateway_incoming" and incoming["fromMeshName"] == "A"
    assert incoming["payload"]["message"]["trustLevel"] == "federated"
    assert await sock_a.next() == {"type": "gateway_ack", "id": "1", "delivered": 1, "queued": 0}
    await gw.dispatch(a, gw.Relay(target_mesh_id="zz", payload={}, id="2"), hub)
    offline = await sock_a.next()
    assert (offline["code"], offline["id"], offline["targetMeshId"]) == ("target_offline", "2", "zz")


async def test_dispatch_broadcast_encodes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = gw.Hub(Settings(), gw.MemoryBackplane())
    sender, sock = await make_peer(hub, "s")
    receivers = [await make_peer(hub, f"r{i}") for i in range(5)]
    encoded: list[type] = []

    class Counting:
        def encode(self, obj: Any) -> bytes:
            encoded.append(type(obj))
            return msgspec.json.encode(obj)

    monkeypatch.setattr(gw, "encoder", Counting())
    await gw.dispatch(sender, gw.Broadcast(payload=mesh_payload(MESSAGE), id="b1"), hub)
    assert encoded.count(gw.Incoming) == 1
    texts = [await s.next() for _, s in receivers]
    assert all(t == texts[0] for t in texts)
    assert await sock.next() == {"type": "gateway_ack", "id": "b1", "delivered": 5, "queued": 0}


async def test_dispatch_rate_limit_relays_nothing() -> None:
    hub = gw.Hub(Settings(rate_limit_per_min=2), gw.MemoryBackplane())
    a, sock_a = await make_peer(hub, "a")
    b, sock_b = await make_peer(hub, "b")
    for i in range(3):
        await gw.dispatch(a, gw.Relay(target_mesh_id="b", payload={"n": i}, id=str(i)), hub)
    assert [(await sock_a.next())["type"] for _ in range(3)] == ["gateway_ack", "gateway_ack", "error"]
    assert b.queued == 0 and sock_b.sent.qsize() == 2


async def test_dispatch_participants_and_ghosts() -> None:
    hub = gw.Hub(Settings(), gw.MemoryBackplane())
    a, sock_a = await make_peer(hub, "a")
    alice = gw.Participant("1", "alice", "user")
    b, sock_b = await make_peer(hub, "b", [alice])
    assert (await sock_a.next())["remoteParticipants"][0]["participants"] == [
        {"id": "1", "name": "alice", "type": "user"}
    ]
    await gw.dispatch(a, gw.UpdateParticipants([gw.Participant("2", "bob", "agent")]), hub)
    assert (await sock_b.next())["remoteParticipants"][0]["meshId"] == "a"
    hub.forget(b)
    assert (await sock_a.next())["remoteParticipants"] == [{"meshId": "b", "meshName": "B", "participants": []}]


def test_the_greeting_reuses_full_frames_but_never_a_stale_or_own_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gw, "FRAME_GROUPS_BYTES", 300)  # about three groups a frame
    hub = gw.Hub(Settings(), gw.MemoryBackplane())

    def put(mesh_id: str, who: str) -> None:
        people = [gw.Participant("1", who, "user")]
        hub._put(gw.Presence(mesh_id, mesh_id.upper(), node="elsewhere", conn="c", claimed_ns=1, participants=people))

    def greeting(newcomer: str) -> dict[str, str]:
        frames = hub.greeting.frames_for(newcomer)
        assert all(len(frame) <= 300 + 200 for frame in frames)
        groups = [g for frame in frames for g in json.loads(frame)["remoteParticipants"]]
        assert len({g["meshId"] for g in groups}) == len(groups)  # each group once
        return {g["meshId"]: g["participants"][0]["name"] for g in groups}

    for n in range(12):
        put(f"m{n:02d}", "alice")
    everyone = {f"m{n:02d}": "alice" for n in range(12)}
    assert greeting("new") == everyone
    assert hub.greeting.count >= 6  # full frames were kept
    put("m12", "carol")  # a new group comes after the kept frames
    assert greeting("new") == everyone | {"m12": "carol"}
    put("m01", "bob")  # a kept group changes: no stale copy is sent
    assert greeting("new") == everyone | {"m12": "carol", "m01": "bob"}
    hub._drop("m02")  # a kept group goes
    assert "m02" not in greeting("new")
    for own in hub.populated:  # never its own group, wherever it lies; the others all, in order
        assert list(greeting(own)) == [m for m in hub.populated if m != own]
    put("m00", "alice")  # a refresh that changes nothing keeps the frames
    kept = hub.greeting.count
    assert kept and greeting("other") and hub.greeting.count == kept


async def test_slow_peer_is_cut_off_at_its_buffer() -> None:
    hub = gw.Hub(Settings(send_buffer_bytes=200 * 1024), gw.MemoryBackplane())
    blocked = asyncio.Event()

    class Stalled(FakeSocket):
        async def __call__(self, message: dict[str, Any]) -> None:
            await blocked.wait()  # never set: the peer never reads

    sender, _ = await make_peer(hub, "s")
    stalled = gw.Peer(Stalled(), hub.settings)  # type: ignore[arg-type]
    stalled.mesh_id = "slow"
    await hub.attach(stalled, gw.AuthOk(mesh_id="slow", name="slow"))
    _fast, fast_sock = await make_peer(hub, "fast")
    for i in range(200):
        hub.broadcast(sender, {"type": "x", "message": str(i) * 1000}, None)
        assert stalled.queued <= stalled.limit + 2000  # at most one frame past it (then it is cut off)
        await asyncio.sleep(0)  # let the writers run, as the event loop would between frames
    assert stalled.closing and "slow" not in hub.peers
    assert stalled.queued == 0  # its queue was dropped, not kept
    for i in range(200):  # the fast peer got every frame, in order
        assert (await fast_sock.next())["payload"]["message"] == str(i) * 1000


# --- HTTP: /register and /health --------------------------------------------------------------


async def test_register_then_harmless_repeat(gate: Gate) -> None:
    first = await gate.register("mesh-1")
    assert (first.status_code, first.json()) == (200, {"ok": True, "created": True})
    again = await gate.register("mesh-1")
    assert (again.status_code, again.json()) == (200, {"ok": True, "created": False})


async def test_register_takeover_is_refused(gate: Gate) -> None:
    assert (await gate.register("victim", secret="the-real-secret")).status_code == 200
    hijack = await gate.register("victim", secret="attacker-secret", name="Evil")
    assert (hijack.status_code, hijack.json()) == (409, {"error": "meshId already registered"})
    node = await gate.connect()
    await node.send(type="gateway_auth", meshId="victim", secret="attacker-secret")
    await node.expect("gateway_auth_error", message="Invalid credentials")
    assert (await node.closed()).code == 1008


async def test_register_rename_and_rotate(gate: Gate) -> None:
    await gate.register("m", secret="old-secret-1")
    renamed = await gate.register("m", secret="old-secret-1", name="New Name", newSecret="new-secret-2")
    assert renamed.json() == {"ok": True, "created": False}
    old = await gate.connect()
    await old.send(type="gateway_auth", meshId="m", secret="old-secret-1")
    await old.expect("gateway_auth_error", message="Invalid credentials")
    new = await gate.connect()
    await new.send(type="gateway_auth", meshId="m", secret="new-secret-2")
    await new.expect("gateway_auth_ok", meshId="m", name="New Name")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"secret": "12345678", "name": "x"}, "meshId"),
        ({"meshId": "bad id!", "secret": "12345678", "name": "x"}, "$.meshId"),
        ({"meshId": "x" * 65, "secret": "12345678", "name": "x"}, "$.meshId"),
        ({"meshId": "", "secret": "12345678", "name": "x"}, "$.meshId"),
        ({"meshId": "ok", "secret": "short", "name": "x"}, "$.secret"),
        ({"meshId": "ok", "secret": "s" * 513, "name": "x"}, "$.secret"),
        ({"meshId": "ok", "secret": "12345678", "name": ""}, "$.name"),
        ({"meshId": "ok", "secret": "12345678", "name": "n" * 101}, "$.name"),
        ({"meshId": "ok", "secret": "12345678", "name": "bad\nname"}, "$.name"),
        ({"meshId": "ok", "secret": 12345678, "name": "x"}, "$.secret"),
        ({"meshId": "ok", "secret": "12345678", "name": "x", "newSecret": "short"}, "$.newSecret"),
        ([1, 2], "object"),
    ],
)
async def test_register_rejects_bad_bodies(gate: Gate, body: Any, needle: str) -> None:
    response = await gate.http.post("/register", json=body)
    assert response.status_code == 400
    assert needle in response.json()["error"]
    assert (await gate.register("ok")).json()["created"] is True  # nothing was stored


async def test_register_rejects_bad_json_and_big_bodies(gate: Gate) -> None:
    bad = await gate.http.post("/register", content=b"{nope", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "invalid JSON" in bad.json()["error"]
    big = b'{"meshId":"a","secret":"12345678","name":"' + b"x" * 17000 + b'"}'
    assert (await gate.http.post("/register", content=big)).status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # streamed: no Content-Length
        for _ in range(20):
            yield b" " * 1024

    assert (await gate.http.post("/register", content=chunks())).status_code == 413
    assert (await gate.http.request("DELETE", "/register", content=big)).status_code == 413


async def test_unregister(gate: Gate) -> None:
    node = await gate.node("gone")
    assert (
        await gate.http.request("DELETE", "/register", json={"meshId": "gone", "secret": "wrong-secret"})
    ).status_code == 403
    assert (
        await gate.http.request("DELETE", "/register", json={"meshId": "nobody", "secret": "whatever1"})
    ).status_code == 404
    assert (await gate.http.request("DELETE", "/register", json={"meshId": "gone"})).status_code == 400
    assert (await gate.http.request("DELETE", "/register", content=b"[]")).status_code == 400
    ok = await gate.http.request("DELETE", "/register", json={"meshId": "gone", "secret": "secret-gone"})
    assert (ok.status_code, ok.json()) == (200, {"ok": True})
    close = await node.closed()
    assert (close.code, close.reason) == (4001, "unregistered")
    again = await gate.connect()
    await again.send(type="gateway_auth", meshId="gone", secret="secret-gone")
    await again.expect("gateway_auth_error", message="Invalid credentials")
    assert (await gate.register("gone", secret="someone-else")).json()["created"] is True


async def test_closed_registration_with_admin_token(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, gateway_admin_token="t0ken")) as gate:
        assert (await gate.register("a")).status_code == 401
        bad = {"authorization": "Bearer wrong"}
        assert (
            await gate.http.post("/register", json={"meshId": "a", "secret": "12345678", "name": "A"}, headers=bad)
        ).status_code == 401
        admin = {"authorization": "Bearer t0ken"}
        body = {"meshId": "a", "secret": "first-secret", "name": "A"}
        assert (await gate.http.post("/register", json=body, headers=admin)).json() == {"ok": True, "created": True}
        body = {"meshId": "a", "secret": "second-secret", "name": "A2"}
        assert (await gate.http.post("/register", json=body, headers=admin)).json() == {"ok": True, "created": False}
        node = await gate.connect()
        await node.send(type="gateway_auth", meshId="a", secret="second-secret")
        await node.expect("gateway_auth_ok", name="A2")
        # a mesh may always delete itself; the admin may delete any mesh without its secret
        assert (
            await gate.http.request("DELETE", "/register", json={"meshId": "a", "secret": "second-secret"})
        ).status_code == 200
        await gate.http.post("/register", json={"meshId": "b", "secret": "b-secret-1", "name": "B"}, headers=admin)
        assert (await gate.http.request("DELETE", "/register", json={"meshId": "b"}, headers=admin)).status_code == 200


async def test_health(gate: Gate) -> None:
    assert await gate.health() == {"ok": True, "connected": 0}
    await gate.node("h1")
    await gate.node("h2")
    assert await gate.health() == {"ok": True, "connected": 2}


async def test_secrets_never_stored_or_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    secret = "very-secret-value-" + uuid.uuid4().hex
    async with running(make_settings(tmp_path)) as gate:
        await gate.register("s", secret=secret)
        node = await gate.connect()
        await node.send(type="gateway_auth", meshId="s", secret=secret)
        await node.expect("gateway_auth_ok")
        bad = await gate.connect()
        await bad.send(type="gateway_auth", meshId="s", secret=secret + "x")
        await bad.expect("gateway_auth_error")
    assert all(secret.encode() not in f.read_bytes() for f in tmp_path.glob("gateway.db*"))
    assert all(secret not in record.getMessage() for record in caplog.records)


async def test_unwritable_database_answers_503(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(make_settings(tmp_path)) as gate:
        assert (await gate.register("ok")).status_code == 200
        real = gw.SqliteStore._put

        def disk_full(self: gw.SqliteStore, *args: Any) -> bool:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(gw.SqliteStore, "_put", disk_full)
        failed = await gate.register("later")
        assert (failed.status_code, failed.json()) == (503, {"error": "registry could not be saved, retry later"})
        monkeypatch.setattr(gw.SqliteStore, "_put", real)  # the disk has room again: the node's retry succeeds
        assert (await gate.register("later")).status_code == 200
        assert set(stored_meshes(tmp_path)) == {"ok", "later"}


async def test_registry_file_is_imported_once_per_content(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    digest = hashlib.sha256(b"node-secret-1").hexdigest()
    path.write_text(
        json.dumps(
            [{"meshId": "a", "secretHash": digest, "name": "A"}, {"meshId": "b", "secretHash": digest, "name": "B"}]
        )
    )
    async with running(make_settings(tmp_path)) as gate:
        assert (
            await gate.http.request("DELETE", "/register", json={"meshId": "a", "secret": "node-secret-1"})
        ).status_code == 200
    async with running(make_settings(tmp_path)):  # the same file again: the deleted mesh stays deleted
        assert set(stored_meshes(tmp_path)) == {"b"}
    path.write_text(json.dumps([{"meshId": "c", "secretHash": digest, "name": "C"}]))
    async with running(make_settings(tmp_path)):  # new content: only what the database lacks is added
        assert set(stored_meshes(tmp_path)) == {"b", "c"}


# --- WebSocket: auth --------------------------------------------------------------------------


async def test_auth_errors(gate: Gate) -> None:
    await gate.register("a")
    unknown = await gate.connect()
    await unknown.send(type="gateway_auth", meshId="nobody", secret="whatever")
    await unknown.expect("gateway_auth_error", message="Invalid credentials")
    assert (await unknown.closed()).code == 1008
    early = await gate.connect()
    await early.send(type="gateway_discover")
    await early.expect("gateway_auth_error", message="Not authenticated")
    await early.send(type="gateway_relay", targetMeshId="a", payload={})
    await early.expect("gateway_auth_error", message="Not authenticated")
    await early.ws.send("{bad")
    await early.error("invalid_json")
    await early.send(type="gateway_auth", meshId="a", secret=5)
    await early.error("invalid_frame")
    await early.send(type="gateway_auth", meshId="a", secret="secret-a")
    await early.expect("gateway_auth_ok", meshId="a")


async def test_auth_timeout(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, auth_timeout_s=0.3)) as gate:
        node = await gate.connect()
        await node.send(type="gateway_discover")
        await node.expect("gateway_auth_error", message="Not authenticated")
        await node.expect("gateway_auth_error", message="Auth timeout")
        assert (await node.closed()).code == 1008


async def test_second_auth_keeps_the_mesh(gate: Gate) -> None:
    a = await gate.node("a")
    await gate.register("b")
    await a.send(type="gateway_auth", meshId="b", secret="secret-b", id="again")
    await a.error("already_authenticated", id="again")
    await a.send(type="gateway_auth", meshId=7)
    await a.error("invalid_frame")
    await a.send(type="gateway_discover")
    result = await a.expect("gateway_discover_result")
    assert [i["meshId"] for i in result["instances"]] == ["a"]


async def test_replacement_keeps_the_newer_socket(gate: Gate) -> None:
    b = await gate.node("b")
    alice = [{"id": "1", "name": "alice", "type": "user"}]
    old = await gate.node("a", participants=alice)
    assert (await b.expect("gateway_participants"))["remoteParticipants"][0]["meshId"] == "a"
    new = await gate.node("a", participants=alice)
    close = await old.closed()
    assert (close.code, close.reason) == (4000, "replaced")
    assert (await b.expect("gateway_participants"))["remoteParticipants"][0]["participants"] == alice
    await b.send(type="gateway_relay", targetMeshId="a", payload=MESSAGE, id="r1")
    await new.expect("gateway_incoming", fromMeshId="b")
    await b.expect("gateway_ack", id="r1", delivered=1)
    assert (await gate.health())["connected"] == 2
    await b.quiet()  # no empty group for "a": the old socket's teardown changed nothing


# --- WebSocket: the real node session ---------------------------------------------------------


def normalize(frame: Any, names: dict[str, str]) -> Any:
    text = json.dumps(frame, sort_keys=True)
    for old, new in names.items():
        text = text.replace(old, new)
    return json.loads(text)


async def test_replays_real_node_session(gate: Gate) -> None:
    """Replay node-session.jsonl: every gw->node frame must come back the same."""
    lines = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    auths = {
        ln["conn"]: ln["frame"] for ln in lines if ln["dir"] == "node->gw" and ln["frame"]["type"] == "gateway_auth"
    }
    names: dict[str, str] = {}
    oks = [ln["frame"] for ln in lines if ln["dir"] == "gw->node" and ln["frame"]["type"] == "gateway_auth_ok"]
    for conn, ok in zip((1, 2), oks, strict=False):
        names[ok["meshId"]] = f"mesh-{conn}"
        names[ok["name"]] = f"Mesh mesh-{conn}"
        assert (
            await gate.register(f"mesh-{conn}", secret=auths[conn]["secret"], name=f"Mesh mesh-{conn}")
        ).status_code == 200
    nodes: dict[int, Node] = {}
    for line in lines:
        conn = line["conn"]
        if line["dir"] == "open":
            nodes[conn] = await gate.connect()
        elif line["dir"] == "node->gw":
            await nodes[conn].send(**normalize(line["frame"], names))
        elif line["dir"] == "gw->node":
            expected = normalize(line["frame"], names)
            assert await nodes[conn].recv() == expected
        elif line["dir"] == "close" and line.get("up_code") is None and line.get("down_code") is None:
            pass
        elif line["dir"] == "close" and conn == 3:
            assert (await nodes[conn].closed()).code == 1008
    assert len(nodes) == 3


# --- WebSocket: relay, broadcast, discovery, participants -------------------------------------


async def test_relay_delivers_sanitized_with_registered_name(gate: Gate) -> None:
    a, b = await gate.node("a"), await gate.node("b")
    await a.send(type="gateway_relay", targetMeshId="b", payload=MESSAGE)
    incoming = await b.expect("gateway_incoming", fromMeshId="a", fromMeshName="Mesh a")
    assert incoming["payload"] == SANITIZED
    await a.send(type="gateway_relay", targetMeshId="b", payload=MESSAGE, id="x")
    await b.expect("gateway_incoming")
    await a.expect("gateway_ack", id="x", delivered=1)
    await a.send(type="gateway_relay", targetMeshId="nobody", payload=MESSAGE, id="y")
    await a.error("target_offline", id="y", targetMeshId="nobody")
    await a.send(type="gateway_relay", targetMeshId="nobody", payload=MESSAGE)
    assert "id" not in await a.error("target_offline")
    await b.quiet()


async def test_binary_frames_are_accepted(gate: Gate) -> None:
    a, b = await gate.node("a"), await gate.node("b")
    await a.ws.send(json.dumps({"type": "gateway_relay", "targetMeshId": "b", "payload": MESSAGE}).encode())
    await b.expect("gateway_incoming", fromMeshId="a")


async def test_passthrough_policy(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, payload_policy="passthrough")) as gate:
        a, b = await gate.node("a"), await gate.node("b")
        await a.send(type="gateway_broadcast", payload=MESSAGE)
        assert (await b.expect("gateway_incoming"))["payload"] == MESSAGE


async def test_broadcast_reaches_every_other_mesh(gate: Gate) -> None:
    nodes = [await gate.node(f"n{i}") for i in range(4)]
    await nodes[0].send(type="gateway_broadcast", payload=MESSAGE, id="b")
    for node in nodes[1:]:
        await node.expect("gateway_incoming", fromMeshId="n0")
    await nodes[0].expect("gateway_ack", id="b", delivered=3)
    await nodes[0].quiet()


async def test_discovery_and_rooms(gate: Gate) -> None:
    a = await gate.node("a", publicRooms=["lobby"])
    b = await gate.node("b")
    await b.send(type="gateway_update_rooms", publicRooms=["x", "y"])
    wanted = [
        {"meshId": "a", "name": "Mesh a", "publicRooms": ["lobby"]},
        {"meshId": "b", "name": "Mesh b", "publicRooms": ["x", "y"]},
    ]
    async with asyncio.timeout(TIMEOUT):  # across processes the update takes a moment
        while sorted(await a.discover(), key=lambda i: i["meshId"]) != wanted:
            await asyncio.sleep(0.01)
    instances = await b.discover()
    assert instances == wanted or (gate.cluster and sorted(instances, key=lambda i: i["meshId"]) == wanted)


async def test_participants_lifecycle(gate: Gate) -> None:
    a = await gate.node("a")
    b = await gate.node("b")  # neither brought participants: nobody gets a participants frame
    await a.quiet()
    bob = [{"id": "2", "name": "bob", "type": "user"}]
    carol = await gate.node("c", participants=bob)
    group = {"meshId": "c", "meshName": "Mesh c", "participants": bob}
    assert (await a.expect("gateway_participants"))["remoteParticipants"] == [group]
    assert (await b.expect("gateway_participants"))["remoteParticipants"] == [group]
    d = await gate.node("d")
    assert (await d.expect("gateway_participants"))["remoteParticipants"] == [group]
    alice = [{"id": "1", "name": "alice", "type": "agent"}]
    await a.send(type="gateway_update_participants", participants=alice)
    for node in (b, carol, d):
        assert (await node.expect("gateway_participants"))["remoteParticipants"][0]["participants"] == alice
    await carol.ws.close()
    for node in (a, b, d):
        assert (await node.expect("gateway_participants"))["remoteParticipants"] == [group | {"participants": []}]


async def test_rename_reaches_the_live_socket(gate: Gate) -> None:
    a, b = await gate.node("a"), await gate.node("b")
    renamed = await gate.register("a", name="Renamed A")
    assert renamed.json() == {"ok": True, "created": False}
    async with asyncio.timeout(TIMEOUT):  # on another process the rename arrives over Redis
        while True:
            await a.send(type="gateway_relay", targetMeshId="b", payload={"type": "hi"})
            if (await b.expect("gateway_incoming"))["fromMeshName"] == "Renamed A":
                break
    async with asyncio.timeout(TIMEOUT):
        while {"meshId": "a", "name": "Renamed A", "publicRooms": []} not in await b.discover():
            await asyncio.sleep(0.01)


# --- WebSocket: bad input, floods, size, liveness ---------------------------------------------


WS_BAD_FRAMES = [(data, code) for data, code, _ in BAD_FRAMES]


async def test_bad_frames_get_one_error_and_nothing_else(gate: Gate) -> None:
    a, b = await gate.node("a"), await gate.node("b")
    for data, code in WS_BAD_FRAMES:
        await a.ws.send(data)
        error = await a.error(code)
        assert error["message"]
    await a.ws.send('{"type":"gateway_relay","targetMeshId":"b","payload":null,"id":"i1"}')
    await a.error("invalid_frame", id="i1")
    await a.send(type="gateway_relay", targetMeshId="b", payload={"type": "after"}, id="ok")
    assert (await b.expect("gateway_incoming"))["payload"] == {"type": "after"}  # nothing relayed before it
    await a.expect("gateway_ack", id="ok", delivered=1)


async def test_bad_frames_before_auth_get_the_same_errors(gate: Gate) -> None:
    node = await gate.connect()
    for data, code in WS_BAD_FRAMES:
        await node.ws.send(data)
        await node.error(code)
    await node.send(type="gateway_discover")
    await node.expect("gateway_auth_error", message="Not authenticated")


async def test_frames_split_and_coalesced_across_reads_all_arrive_in_order(gate: Gate) -> None:
    """The gateway's own frame parser: frames cut at every byte, many in one read, a ping among
    them, and a fragmented message (handed to websockets' parser with all that follows)."""
    a = await gate.node("a")
    assert (await gate.register("b")).status_code == 200
    b = await RawNode.open(gate)
    await b.auth("b")

    def relay(n: int) -> bytes:
        frame = {"type": "gateway_relay", "targetMeshId": "a", "payload": {"type": f"m{n}"}, "id": str(n)}
        return json.dumps(frame).encode()

    protocol = b.protocol
    for n in range(3):
        protocol.send_text(relay(n))
    protocol.send_ping(b"ping")
    protocol.send_binary(relay(3))
    protocol.send_text(relay(4) + b" " * 200)  # a 16-bit length
    for byte in b"".join(protocol.data_to_send()):  # one byte per write
        b.writer.write(bytes([byte]))
        await b.writer.drain()
    for n in range(5, 8):
        protocol.send_text(relay(n))
    text = relay(8)
    protocol.send_text(text[:10], fin=False)  # a fragmented message: websockets parses from here on
    protocol.send_continuation(text[10:], fin=True)
    protocol.send_text(relay(9))
    b.writer.write(b"".join(protocol.data_to_send()))  # all in one write
    got = [(await a.expect("gateway_incoming"))["payload"]["type"] for _ in range(10)]
    assert got == [f"m{n}" for n in range(10)]
    assert [(await b.answer(str(n)))["type"] for n in range(10)] == ["gateway_ack"] * 10


async def test_invalid_utf8_text_frame_closes_1007(gate: Gate) -> None:
    a = await gate.node("a")
    await a.ws.send(b'{"type":"gateway_discover","x":"\xff"}', text=True)
    assert (await a.closed()).code == 1007
    b = await gate.node("b")
    await b.quiet()


async def test_frame_too_large(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, max_frame_bytes=1000, ws_max_bytes=64 * 1024)) as gate:
        early = await gate.connect()
        big = json.dumps({"type": "gateway_broadcast", "payload": {"content": "x" * 2000}, "id": "big"})
        await early.ws.send(big)
        await early.error("frame_too_large", id="big")
        a, b = await gate.node("a"), await gate.node("b")
        await a.ws.send(big)
        await a.error("frame_too_large", id="big")
        await a.ws.send("é" * 600)  # 600 characters, 1200 bytes
        await a.error("frame_too_large")
        await a.quiet()
        await b.quiet()
        await a.ws.send("x" * (65 * 1024))
        assert (await a.closed()).code == 1009
        await b.quiet()


async def test_rate_limit_flood(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, rate_limit_per_min=5)) as gate:
        a, b = await gate.node("a"), await gate.node("b")
        for i in range(5):
            await a.send(type="gateway_relay", targetMeshId="b", payload={"type": f"n{i}"})
        for i in range(5):
            assert (await b.expect("gateway_incoming"))["payload"] == {"type": f"n{i}"}
        await a.send(type="gateway_broadcast", payload={"n": 99}, id="over")
        error = await a.error("rate_limited", id="over")
        assert 0 < error["retryAfterMs"] <= 12000
        await b.quiet()  # the over-limit broadcast was not relayed
        again = await gate.connect()  # reconnecting does not refill the mesh's bucket
        await again.send(type="gateway_auth", meshId="a", secret="secret-a")
        await again.expect("gateway_auth_ok")
        await again.send(type="gateway_relay", targetMeshId="b", payload={"type": "more"}, id="still-over")
        await again.error("rate_limited", id="still-over")


async def test_unanswered_pings_close_1011(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, ping_interval_s=0.2, ping_timeout_s=0.2)) as gate:
        a = await gate.node("a")
        a.ws.transport.pause_reading()  # the node stops answering pings
        await gate.wait_connected(0)
        a.ws.transport.resume_reading()
        assert (await a.closed()).code == 1011


async def test_slow_receiver_is_cut_off_without_slowing_others(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, send_buffer_bytes=256 * 1024, rate_limit_per_min=100_000, max_frame_bytes=60_000)
    app = gw.create_app(settings)
    async with running(settings, app) as gate:
        sender, fast = await gate.node("sender"), await gate.node("fast")
        slow = await gate.node("slow", rcvbuf=16 * 1024)
        slow.ws.transport.pause_reading()
        payload = {"type": "bulk", "message": "x" * 50_000}
        for i in range(200):  # 10 MB: past the slow node's 256 KiB and the kernel's socket buffers
            await sender.send(type="gateway_broadcast", payload=payload | {"type": f"bulk-{i}"})
            assert (await fast.expect("gateway_incoming"))["payload"]["type"] == f"bulk-{i}"
        await gate.wait_connected(2)
        slow.ws.transport.resume_reading()
        assert (await slow.closed()).code == 1013
        await sender.send(type="gateway_relay", targetMeshId="slow", payload={}, id="gone")
        await sender.expect("gateway_ack", id="gone", delivered=0, queued=1)  # kept for its return


async def test_a_bug_in_one_connection_closes_only_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(make_settings(tmp_path)) as gate:
        a, b = await gate.node("a"), await gate.node("b")
        real = gw.dispatch

        async def broken(peer: gw.Peer, frame: Any, hub: gw.Hub) -> None:
            if peer.mesh_id == "a":
                raise ValueError("a bug")
            await real(peer, frame, hub)

        monkeypatch.setattr(gw, "dispatch", broken)
        await a.send(type="gateway_discover")
        assert (await a.closed()).code == 1011
        await b.send(type="gateway_relay", targetMeshId="b", payload={"type": "still here"}, id="ok")
        await b.expect("gateway_incoming", fromMeshId="b")
        await b.expect("gateway_ack", id="ok", delivered=1)
        assert (await gate.health())["connected"] == 1


# --- Limits against abuse: bounded work and memory per stranger, per mesh, per IP -------------


async def raw_upgrade(addr: str, headers: str = "") -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A bare WebSocket handshake (the attacks below need frames no library sends)."""
    host, port = addr.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /gateway HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n".encode()
    )
    async with asyncio.timeout(TIMEOUT):
        response = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, response


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, length: int | None = None) -> bytes:
    """A masked client frame; `length` may announce more than is sent."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    head += (
        bytes([0x80 | n])
        if n < 126
        else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        if n < 65536
        else bytes([0x80 | 127]) + n.to_bytes(8, "big")
    )
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Read until the server ends the connection (EOF or reset)."""
    async with asyncio.timeout(TIMEOUT):
        with contextlib.suppress(ConnectionResetError):
            while await reader.read(65536):
                pass
    return True


async def test_the_greeting_never_locks_a_new_mesh_out(tmp_path: Path) -> None:
    """Participant lists far larger than the send buffer reach a new mesh in bounded frames, at its
    pace (the issue's 5,000 meshes x 25 participants against 1 MiB, scaled down for the suite)."""
    settings = make_settings(tmp_path, send_buffer_bytes=64 * 1024, rate_limit_per_min=100_000)
    async with running(settings) as gate:
        people = [{"id": f"u{i:02d}", "name": f"Person {i}", "type": "user"} for i in range(25)]
        for n in range(120):  # 120 x 25 participants: ~130 KB of groups, 4x the socket's limit
            assert (await gate.register(f"big-{n}")).status_code == 200
            await (await RawNode.open(gate)).auth(f"big-{n}", participants=people)  # reads all it is sent
        assert (await gate.register("late")).status_code == 200
        late = await gate.connect()
        await late.send(type="gateway_auth", meshId="late", secret="secret-late")
        await late.expect("gateway_auth_ok")
        groups: dict[str, Any] = {}
        while len(groups) < 120:
            frame = await late.expect("gateway_participants")
            assert len(json.dumps(frame, separators=(",", ":"), ensure_ascii=False)) <= 65 * 1024  # bounded frames
            groups.update({grp["meshId"]: grp for grp in frame["remoteParticipants"]})
        assert len(await late.discover()) == 121


async def test_a_new_mesh_joins_5000_meshes_with_25_participants_each(tmp_path: Path) -> None:
    """The issue's scale: 5,000 meshes (here held by 'another process', injected into the hub as
    the Redis backplane would) with 25 participants each, a 6 MB greeting against a 1 MiB send
    buffer. A real new mesh joins, gets every group in bounded frames, and discovers them all."""
    settings = make_settings(tmp_path)
    gateway = gw.Gateway(settings)
    app = Starlette(routes=gateway.routes, lifespan=gateway.lifespan)
    async with running(settings, app) as gate:
        people = [gw.Participant(f"user-{i:02d}", f"Person number {i}", "user") for i in range(25)]
        for n in range(5000):
            gateway.hub._put(
                gw.Presence(f"far-{n}", f"Far {n}", node="elsewhere", conn=f"c{n}", claimed_ns=n, participants=people)
            )
        assert (await gate.register("late")).status_code == 200
        late = await gate.connect()
        await late.send(type="gateway_auth", meshId="late", secret="secret-late")
        await late.expect("gateway_auth_ok")
        groups: set[str] = set()
        while len(groups) < 5000:
            frame = await late.expect("gateway_participants")
            groups.update(grp["meshId"] for grp in frame["remoteParticipants"])
        assert len(await late.discover()) == 5001
        peer = gateway.hub.peers["late"]
        assert peer.queued <= peer.limit and not peer.closing  # never held more than its buffer


async def test_updates_and_discovers_are_rate_limited_and_coalesced(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, update_rate_per_min=5)) as gate:
        a, b = await gate.node("a"), await gate.node("b")
        for n in range(8):
            await a.send(type="gateway_update_participants", participants=[{"id": str(n), "name": "x", "type": "user"}])
        limited = [await a.error("rate_limited") for _ in range(3)]
        assert all(e["retryAfterMs"] > 0 for e in limited)
        frames = [await b.expect("gateway_participants")]  # the 5 admitted updates, coalesced
        with contextlib.suppress(TimeoutError):
            while True:
                frames.append(await b.recv(timeout=0.3))
        assert len(frames) < 5 and frames[-1]["remoteParticipants"][0]["participants"][0]["id"] == "4"
        for _ in range(6):
            await b.send(type="gateway_discover")
        answers = [(await b.recv())["type"] for _ in range(6)]
        assert answers.count("gateway_discover_result") == 5 and answers.count("error") == 1


async def test_nothing_reaches_a_socket_before_its_auth_ok(gate: Gate) -> None:
    busy = await gate.node("busy")
    for n in range(5):  # announcements in flight while others join
        await busy.send(type="gateway_update_participants", participants=[{"id": str(n), "name": "x", "type": "user"}])
    for n in range(5):
        assert (await gate.register(f"joiner-{n}")).status_code == 200
        node = await gate.connect()
        await node.send(type="gateway_auth", meshId=f"joiner-{n}", secret=f"secret-joiner-{n}")
        assert (await node.recv())["type"] == "gateway_auth_ok"


async def test_a_big_message_before_auth_closes_1009(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, max_frame_bytes=60_000)) as gate:
        node = await gate.connect()
        await node.send(type="gateway_auth", meshId="x", secret="y" * 17_000)  # over 16 KiB, under WS_MAX_BYTES
        assert (await node.closed()).code == 1009
        ok = await gate.node("legit")
        await ok.send(
            type="gateway_relay", targetMeshId="legit", payload={"type": "m", "message": "z" * 20_000}, id="big"
        )
        await ok.expect("gateway_incoming")  # after auth, big messages are fine


async def test_unfinished_frames_before_auth_cost_at_most_16_kib(tmp_path: Path) -> None:
    async with process(tmp_path) as (proc, addr):
        sockets = []
        for _ in range(300):  # each starts a 1 MiB frame and sends 20 KiB of it
            reader, writer, response = await raw_upgrade(addr)
            assert b" 101 " in response
            writer.write(client_frame(1, b"x" * 20_000, length=1 << 20)[:20_014])
            sockets.append((reader, writer))
        for reader, _ in sockets:
            assert await closed_by_server(reader)  # at 16 KiB, not 1 MiB
        status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        rss_kb = int(next(line for line in status if line.startswith("VmRSS")).split()[1])
        assert rss_kb < 200 * 1024
        async with httpx.AsyncClient(base_url=f"http://{addr}") as http:
            gate = Gate([addr], http)
            async with gate.stack:
                a, _ = await gate.node("a"), await gate.node("b")
                await relay_all(a, "b", range(1), delivered=1)
        for _, writer in sockets:
            writer.close()


async def test_a_ping_flood_that_never_reads_is_dropped(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, send_buffer_bytes=64 * 1024, auth_timeout_s=30)
    gateway = gw.Gateway(settings)
    async with running(settings, gw.serving_app(gateway)) as gate:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        host, port = gate.addr.split(":")
        sock.connect((host, int(port)))
        _reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(
            f"GET /gateway HTTP/1.1\r\nHost: {gate.addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        ping = client_frame(9, b"p" * 125)
        dropped = False
        async with asyncio.timeout(TIMEOUT):
            for _ in range(200_000):  # 25 MB of pongs owed, never read
                writer.write(ping * 64)
                try:
                    await writer.drain()
                except ConnectionError:
                    dropped = True
                    break
        assert dropped
        assert (await gate.health())["ok"]
        writer.close()
        async with asyncio.timeout(TIMEOUT):  # counted in the metrics as a cut-off
            while gateway.stats.cut_off != 1:
                await asyncio.sleep(0.01)


async def test_the_auth_timeout_closes_a_socket_whatever_it_sends(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, auth_timeout_s=0.3)) as gate:
        reader, writer, _ = await raw_upgrade(gate.addr)
        async with asyncio.timeout(TIMEOUT):
            with contextlib.suppress(ConnectionError):
                while not reader.at_eof():
                    writer.write(client_frame(9, b"still here"))  # pings keep coming, the socket never reads
                    await writer.drain()
                    await asyncio.sleep(0.01)
        writer.close()


async def test_http_headers_and_slow_bodies_are_bounded(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, auth_timeout_s=0.5)) as gate:
        big = await gate.http.get("/health", headers={"x-padding": "a" * 20_000})
        assert big.status_code == 431
        assert (await gate.http.get("/health")).status_code == 200
        host, port = gate.addr.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b'POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"mesh'
        )
        async with asyncio.timeout(TIMEOUT):
            status = await reader.readline()
        assert b" 408 " in status
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 response off a raw connection; returns its status code."""
    status = (await reader.readline()).split()[1]
    length = 0
    while (line := await reader.readline()) != b"\r\n":
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


async def test_a_request_right_behind_a_body_is_not_taken_for_headers(tmp_path: Path) -> None:
    """The header cap counts a request's headers, not its body, even when those headers arrived in
    one read with the end of the request before (a client sends its next request right behind)."""
    async with running(make_settings(tmp_path)) as gate:
        host, port = gate.addr.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        first = b"{nope"
        head = "POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        chunk = b"%x\r\n%s\r\n" % (9000, b" " * 9000)  # a streamed body: read until it passes 16 KiB
        first_request = f"{head}Content-Length: {len(first)}\r\n\r\n".encode() + first
        writer.write(first_request + f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunk)
        async with asyncio.timeout(TIMEOUT):
            assert await read_response(reader) == b"400"  # the first read is parsed: the rest comes after it
            writer.write(chunk * 2 + b"0\r\n\r\n")
            assert await read_response(reader) == b"413"
        writer.close()


async def test_handshakes_past_the_caps_get_503(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, max_pending_auth=2, max_connections=3)) as gate:
        strangers = [await gate.connect(), await gate.connect()]
        with pytest.raises(websockets.InvalidStatus) as refused:
            await gate.connect()
        assert refused.value.response.status_code == 503
        await strangers[0].send(type="gateway_auth", meshId="x", secret="nope-nope")  # no longer pending once refused
        await strangers[0].closed()
        a, _ = await gate.node("a"), await gate.node("b")  # pending back under the cap: 3 sockets in all
        with pytest.raises(websockets.InvalidStatus) as refused:
            await gate.connect()
        assert refused.value.response.status_code == 503
        await relay_all(a, "b", range(1), delivered=1)


async def test_the_pacer_takes_up_a_few_new_connections_a_turn_in_order() -> None:
    class Transport:
        def __init__(self) -> None:
            self.paused = False
            self.closing = False

        def pause_reading(self) -> None:
            self.paused = True

        def resume_reading(self) -> None:
            self.paused = False

        def is_closing(self) -> bool:
            return self.closing

    pacer = gw.Pacer(per_turn=4)
    taken: list[int] = []
    transports = [Transport() for _ in range(11)]
    now = [pacer.admit(t, lambda n=n: taken.append(n)) for n, t in enumerate(transports)]  # type: ignore[arg-type]
    assert now == [True] * 4 + [False] * 7 and all(t.paused for t in transports[4:])
    transports[5].closing = True  # it left while waiting: skipped
    await asyncio.sleep(0)
    assert taken == [4, 6, 7, 8] and not transports[4].paused  # the next turn: four more, in order
    await asyncio.sleep(0)
    assert taken == [4, 6, 7, 8, 9, 10]
    assert pacer.admit(Transport(), lambda: None)  # nobody waits: at once  # type: ignore[arg-type]
    await asyncio.sleep(0)

    def fails() -> None:
        raise RuntimeError("a bug in one connection")

    loop = asyncio.get_running_loop()
    errors: list[object] = []
    loop.set_exception_handler(lambda _, context: errors.append(context.get("exception")))
    try:
        pacer.per_turn = 1  # one a turn: the failing one, then the other on the turn after
        pacer.left = 0  # this turn is spent: both wait
        assert not pacer.admit(Transport(), fails)  # type: ignore[arg-type]
        assert not pacer.admit(Transport(), lambda: taken.append(11))  # type: ignore[arg-type]
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert len(errors) == 1 and taken[-1] == 11  # not held up behind the one that failed


def test_the_pacer_starts_afresh_on_a_new_loop() -> None:
    """A server stopped with connections waiting (a test's loop closed) holds up no later one."""
    pacer = gw.Pacer(per_turn=1)
    transport = unittest.mock.Mock(is_closing=lambda: False)

    async def storm() -> list[bool]:  # the loop ends before the waiting one's turn comes
        return [pacer.admit(transport, lambda: None) for _ in range(3)]

    assert asyncio.run(storm()) == [True, False, False]

    async def later() -> bool:
        return pacer.admit(transport, lambda: None)

    assert asyncio.run(later())  # at once, not behind the old loop's never-run turn


async def test_failed_auths_are_throttled_per_mesh_and_per_ip(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, auth_failures_per_min=3)) as gate:
        assert (await gate.register("victim")).status_code == 200
        for _ in range(3):
            node = await gate.connect()
            await node.send(type="gateway_auth", meshId="victim", secret="guess-guess")
            await node.expect("gateway_auth_error", message="Invalid credentials")
        node = await gate.connect()  # the right secret now: not even checked
        await node.send(type="gateway_auth", meshId="victim", secret="secret-victim")
        refused = await node.expect("gateway_auth_error", message="Too many attempts")
        assert refused["retryAfterMs"] > 0
        assert (await node.closed()).code == 1013
        other = await gate.connect()  # the same IP, another mesh: throttled too (per IP)
        await gate.register("bystander")
        await other.send(type="gateway_auth", meshId="bystander", secret="secret-bystander")
        await other.expect("gateway_auth_error", message="Too many attempts")


async def test_guesses_for_unknown_meshids_hash_nothing_but_count_against_the_ip(tmp_path: Path) -> None:
    """A flood of guesses for ids nobody registered costs no secret check (so none of the CPU a
    legit auth needs), and is throttled per IP like wrong secrets."""
    settings = make_settings(tmp_path, auth_failures_per_min=3)
    gateway = gw.Gateway(settings)
    checked: list[str] = []
    verify = gateway._verify

    async def counted(secret: str, secret_hash: str, *, urgent: bool = False) -> bool:
        checked.append(secret)
        return await verify(secret, secret_hash, urgent=urgent)

    gateway._verify = counted  # type: ignore[method-assign]
    async with running(settings, gw.serving_app(gateway)) as gate:
        for n in range(3):
            node = await gate.connect()
            await node.send(type="gateway_auth", meshId=f"nobody-{n}", secret="guess-guess")
            await node.expect("gateway_auth_error", message="Invalid credentials")
            assert (await node.closed()).code == 1008
        assert checked == []
        await gate.register("bystander")
        node = await gate.connect()  # the same IP, a registered mesh: throttled by the unknown ids' failures
        await node.send(type="gateway_auth", meshId="bystander", secret="secret-bystander")
        await node.expect("gateway_auth_error", message="Too many attempts")
        assert (await node.closed()).code == 1013 and checked == []


async def test_guessing_secrets_on_register_is_throttled(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, auth_failures_per_min=2, register_per_min=100)) as gate:
        assert (await gate.register("victim")).status_code == 200
        for _ in range(2):
            assert (await gate.register("victim", secret="wrong-secret")).status_code == 409
        throttled = await gate.register("victim")  # even the right secret
        assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
        delete = await gate.http.request("DELETE", "/register", json={"meshId": "victim", "secret": "secret-victim"})
        assert delete.status_code == 429


async def test_registrations_are_limited_per_ip_and_in_all(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path, register_per_min=3, max_meshes=4)) as gate:
        assert [(await gate.register(f"r{i}")).status_code for i in range(4)] == [200, 200, 200, 429]
        limited = await gate.register("r3")
        assert limited.status_code == 429 and "retry-after" in limited.headers
    (tmp_path / "closed").mkdir()
    async with running(
        make_settings(tmp_path / "closed", gateway_admin_token="t", register_per_min=1, max_meshes=3)
    ) as gate:
        admin = {"Authorization": "Bearer t"}
        codes = [
            (
                await gate.http.post(
                    "/register", json={"meshId": f"x{i}", "secret": "secret-x", "name": "X"}, headers=admin
                )
            ).status_code
            for i in range(4)
        ]
        assert codes == [200, 200, 200, 507]  # the bearer is never rate limited; the registry is full
        body = {"meshId": "x9", "secret": "secret-x", "name": "X"}
        full = await gate.http.post("/register", json=body, headers=admin)
        assert full.json() == {"error": "registry full"}


async def test_the_client_ip_comes_from_trusted_proxies_only(tmp_path: Path) -> None:
    for trusted, throttled in (("127.0.0.1", False), ("", True)):
        folder = tmp_path / (trusted or "none")
        folder.mkdir()
        async with running(
            make_settings(folder, auth_failures_per_min=2, forwarded_allow_ips=trusted or "10.255.255.255")
        ) as gate:
            for n in range(3):
                await gate.register(f"victim-{n}")
            results = []
            for n in range(3):  # each guess says it comes from another address, at another mesh
                node = await gate.connect(headers={"X-Forwarded-For": f"192.0.2.{n}"})
                await node.send(type="gateway_auth", meshId=f"victim-{n}", secret="guess-guess")
                results.append((await node.expect("gateway_auth_error"))["message"])
            assert (results[-1] == "Too many attempts") is throttled


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"meshId": "victim\n", "secret": "secret-123", "name": "V"}, "meshId"),
        ({"meshId": ".", "secret": "secret-123", "name": "V"}, "meshId"),
        ({"meshId": "..", "secret": "secret-123", "name": "V"}, "meshId"),
        ({"meshId": "m", "secret": "secret-123", "name": "\u3164"}, "visible"),
        ({"meshId": "m", "secret": "secret-123", "name": "\u2800\u2800"}, "visible"),
        ({"meshId": "m", "secret": "secret-123", "name": "\u0301" * 99}, "visible"),
        ({"meshId": "m", "secret": "secret-123", "name": " \u200b "}, "name"),
    ],
)
async def test_identities_that_look_like_others_are_refused(tmp_path: Path, body: dict[str, str], needle: str) -> None:
    async with running(make_settings(tmp_path)) as gate:
        response = await gate.http.post("/register", json=body)
        assert response.status_code == 400 and needle in response.json()["error"]
        assert (
            await gate.http.post("/register", json={"meshId": "Victim", "secret": "secret-123", "name": "Ünïcødé 名"})
        ).status_code == 200
        assert (
            await gate.http.post("/register", json={"meshId": "victim", "secret": "secret-456", "name": "v"})
        ).status_code == 200  # case matters


async def test_the_file_descriptor_limit_is_raised(tmp_path: Path) -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 256:
        pytest.skip("hard limit too low to test")
    env = os.environ | {"PORT": str(free_port()), "HOST": "127.0.0.1", "DB_PATH": str(tmp_path / "gateway.db")}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "gateway.py")],
        env=env,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    )
    try:
        async with asyncio.timeout(15):
            while "file descriptor limit" not in (line := (await asyncio.to_thread(proc.stderr.readline)).decode()):  # type: ignore[union-attr]
                assert line, "the gateway exited"
        assert line.strip().endswith(str(hard))
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        assert f"Max open files            {hard}" in limits
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]


# --- Offline delivery: kept for away meshes, confirmed by the node ----------------------------


async def test_relay_to_an_away_mesh_is_kept_and_delivered_once_in_order(tmp_path: Path) -> None:
    async with running(offline_settings(tmp_path)) as gate:
        a = await gate.node("a", [{"id": "u1", "name": "alice", "type": "user"}])
        await away(gate, "b")
        await relay_all(a, "b", range(5), delivered=0, queued=1)
        health = (await gate.http.get("/health")).json()
        assert (health["away"], health["queued"]) == (1, 5)
        # after gateway_auth_ok and the participant groups, before any live frame
        b = await gate.connect()
        await b.send(type="gateway_auth", meshId="b", secret="secret-b")
        await b.expect("gateway_auth_ok")
        assert (await b.expect("gateway_participants"))["remoteParticipants"][0]["meshId"] == "a"
        kept = [await b.expect("gateway_incoming", fromMeshId="a", fromMeshName="Mesh a") for _ in range(5)]
        assert contents(kept) == list(range(5))
        await relay_all(a, "b", range(5, 6), delivered=1, queued=0)
        assert contents([await b.expect("gateway_incoming")]) == [5]
        await b.quiet()  # nothing twice
        async with asyncio.timeout(TIMEOUT):  # kept until the node confirms them
            while (health := (await gate.http.get("/health")).json())["queued"]:
                await asyncio.sleep(0.01)
        assert health["away"] == 0


async def test_nothing_is_written_per_frame_while_everyone_is_connected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs: list[str] = []
    real = gw.SqliteStore.call

    def counting(self: gw.SqliteStore, fn: Any, *args: Any) -> Any:
        jobs.append(fn.__name__)
        return real(self, fn, *args)

    monkeypatch.setattr(gw.SqliteStore, "call", counting)
    async with running(offline_settings(tmp_path)) as gate:
        a, b, c = await gate.node("a"), await gate.node("b"), await gate.node("c")
        for node in (a, b, c):  # their auths are through (arrival written)
            await node.quiet()
        jobs.clear()
        await relay_all(a, "b", range(50), delivered=1)
        for n in range(50):
            await a.send(type="gateway_broadcast", payload={"type": "m", "message": n}, id=f"b{n}")
            await a.expect("gateway_ack", id=f"b{n}", delivered=2, queued=0)
        assert len([await b.expect("gateway_incoming") for _ in range(100)]) == 100
        assert len([await c.expect("gateway_incoming") for _ in range(50)]) == 50
        assert jobs == []


async def test_relay_to_a_mesh_that_never_connected_is_target_offline(tmp_path: Path) -> None:
    async with running(offline_settings(tmp_path)) as gate:
        a = await gate.node("a")
        assert (await gate.register("never")).status_code == 200
        for target in ("never", "unknown"):
            await a.send(type="gateway_relay", targetMeshId=target, payload={"type": "m"}, id="x")
            await a.error("target_offline", id="x", targetMeshId=target)


async def test_broadcasts_are_kept_once_for_every_away_mesh(tmp_path: Path) -> None:
    async with running(offline_settings(tmp_path)) as gate:
        a, live = await gate.node("a"), await gate.node("live")
        await away(gate, "b")
        await away(gate, "c")
        await a.send(type="gateway_broadcast", payload={"type": "m", "message": "one"}, id="b1")
        await a.expect("gateway_ack", id="b1", delivered=1, queued=2)
        assert kept_rows(tmp_path) == 1  # stored once for both
        await relay_all(a, "b", range(1), delivered=0, queued=1)
        await a.send(type="gateway_broadcast", payload={"type": "m", "message": "two"}, id="b2")
        await a.expect("gateway_ack", id="b2", delivered=1, queued=2)
        assert contents([await live.expect("gateway_incoming") for _ in range(2)]) == ["one", "two"]
        late = await gate.node("late")  # registered and first connected after the broadcasts: gets none
        b, kept = await returning(gate, "b", 3)
        assert contents(kept) == ["one", 0, "two"]  # one order across relays and broadcasts
        c, kept = await returning(gate, "c", 2)
        assert contents(kept) == ["one", "two"]
        for node in (b, c, late, a):  # nobody gets a frame twice, nor its own broadcast
            await node.quiet()
        async with asyncio.timeout(TIMEOUT):  # stored once, and gone once everyone confirmed it
            while kept_rows(tmp_path):
                await asyncio.sleep(0.02)


async def test_delete_discards_the_mailbox(tmp_path: Path) -> None:
    async with running(offline_settings(tmp_path)) as gate:
        a = await gate.node("a")
        await away(gate, "b")
        await relay_all(a, "b", range(3), delivered=0, queued=1)
        deleted = await gate.http.request("DELETE", "/register", json={"meshId": "b", "secret": "secret-b"})
        assert deleted.status_code == 200
        await a.send(type="gateway_relay", targetMeshId="b", payload={"type": "m"}, id="gone")
        await a.error("target_offline", id="gone")
        b = await gate.node("b")  # registered again: a new mesh, an empty mailbox
        await b.quiet()
        assert (await gate.http.get("/health")).json()["queued"] == 0


async def test_bounds_drop_the_oldest_and_tell_the_mesh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running(offline_settings(tmp_path, offline_max_messages=3)) as gate:
        a = await gate.node("a")
        await away(gate, "b")
        await relay_all(a, "b", range(5), delivered=0, queued=1)
        b = await gate.connect()
        await b.send(type="gateway_auth", meshId="b", secret="secret-b")
        await b.expect("gateway_auth_ok")
        await b.error("messages_dropped", count=2)  # right after gateway_auth_ok
        assert contents([await b.expect("gateway_incoming") for _ in range(3)]) == [2, 3, 4]
        await b.quiet()
    assert any("mesh b" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)


async def test_total_bytes_bound_drops_from_the_fullest_mailbox(tmp_path: Path) -> None:
    async with running(offline_settings(tmp_path, offline_max_bytes=6000)) as gate:
        a = await gate.node("a")
        await away(gate, "big")
        await away(gate, "small")
        await relay_all(a, "small", range(1), delivered=0, queued=1)
        for n in range(40):  # ~300 B each: 12,000 B in all, twice the bound
            await a.send(
                type="gateway_relay", targetMeshId="big", payload={"type": f"m{n}", "message": "x" * 200}, id=f"p{n}"
            )
            await a.expect("gateway_ack", id=f"p{n}", queued=1)
        assert (await gate.http.get("/health")).json()["queued"] <= 21
        _, kept = await returning(gate, "small", 1)  # the small mailbox was not touched
        assert contents(kept) == [0]
        big = await gate.connect()
        await big.send(type="gateway_auth", meshId="big", secret="secret-big")
        await big.expect("gateway_auth_ok")
        dropped = (await big.error("messages_dropped"))["count"]
        assert dropped >= 19
        kept = [await big.expect("gateway_incoming") for _ in range(40 - dropped)]
        assert [f["payload"]["type"] for f in kept] == [f"m{n}" for n in range(dropped, 40)]  # the newest, in order
        await big.quiet()


async def test_frames_and_meshes_expire_after_the_ttl(tmp_path: Path) -> None:
    async with running(offline_settings(tmp_path, offline_ttl_s=0.5)) as gate:
        a = await gate.node("a")
        await away(gate, "b")
        await relay_all(a, "b", range(1), delivered=0, queued=1)
        async with asyncio.timeout(TIMEOUT):  # away longer than the TTL: no longer away, its frames expired
            while (await gate.http.get("/health")).json()["away"]:
                await asyncio.sleep(0.05)
        await a.send(type="gateway_relay", targetMeshId="b", payload={"type": "m"}, id="late")
        await a.error("target_offline", id="late")
        b = await gate.node("b")
        await b.quiet()


async def test_offline_delivery_off(tmp_path: Path) -> None:
    async with running(offline_settings(tmp_path, offline_ttl_s=0)) as gate:
        a = await gate.node("a")
        await away(gate, "b")
        await a.send(type="gateway_relay", targetMeshId="b", payload={"type": "m"}, id="x")
        await a.error("target_offline", id="x")
        await a.send(type="gateway_broadcast", payload={"type": "m"}, id="y")
        assert "queued" not in (await gate.http.get("/health")).json()
        b = await gate.node("b")
        await b.quiet()


async def test_only_confirmed_frames_are_never_sent_again(tmp_path: Path) -> None:
    async with running(offline_settings(tmp_path)) as gate:
        a = await gate.node("a")
        assert (await gate.register("b")).status_code == 200
        b = await RawNode.open(gate)
        await b.auth("b")
        b.hold()  # b handles frames but its pongs wait
        await relay_all(a, "b", range(3), delivered=1)
        assert contents([await b.expect("gateway_incoming") for _ in range(3)]) == [0, 1, 2]
        async with asyncio.timeout(TIMEOUT):  # a confirmation ping came after them
            while b.pending:
                await asyncio.sleep(0.01)
        b.release()  # confirms 0..2
        await b.send(type="gateway_discover")  # read after the pongs: they have arrived
        await b.expect("gateway_discover_result")
        b.hold()
        await relay_all(a, "b", range(3, 6), delivered=1)
        assert contents([await b.expect("gateway_incoming") for _ in range(3)]) == [3, 4, 5]
        b.kill()  # received 3..5 but never confirmed them
        await gate.wait_connected(1)
        await relay_all(a, "b", range(6, 8), queued=1)
        back, kept = await returning(gate, "b", 5)
        assert contents(b.handled) == [0, 1, 2]
        assert contents(kept) == [3, 4, 5, 6, 7]
        await back.quiet()


@pytest.mark.parametrize("how", ["close", "kill", "replace"])
async def test_no_way_of_leaving_loses_a_frame(tmp_path: Path, how: str) -> None:
    async with running(offline_settings(tmp_path)) as gate:
        a = await gate.node("a")
        assert (await gate.register("b")).status_code == 200
        b = await RawNode.open(gate)
        await b.auth("b")
        b.hold()
        await relay_all(a, "b", range(4), delivered=1)
        assert contents([await b.expect("gateway_incoming") for _ in range(4)]) == [0, 1, 2, 3]
        if how == "replace":  # its newer connection takes over: the old one's unconfirmed frames move to it
            back, kept = await returning(gate, "b", 4)
            assert await b.closed == 4000
            await relay_all(a, "b", range(4, 6), delivered=1)
            assert contents(kept + [await back.expect("gateway_incoming") for _ in range(2)]) == list(range(6))
            return
        if how == "close":
            await b.close(drop_pongs=True)  # a clean close, the pongs never sent
        else:
            b.kill()
        await gate.wait_connected(1)
        await relay_all(a, "b", range(4, 6), queued=1)
        back, kept = await returning(gate, "b", 6)
        assert contents(kept) == list(range(6))
        await back.quiet()


async def test_a_frozen_network_loses_nothing(tmp_path: Path) -> None:
    async with running(offline_settings(tmp_path, ping_interval_s=0.2, ping_timeout_s=0.3)) as gate:
        a = await gate.node("a")
        assert (await gate.register("b")).status_code == 200
        proxy = FreezableProxy(gate.addr)
        async with proxy as via:
            b = await RawNode.open(gate, via)
            await b.auth("b")
            b.hold()
            await relay_all(a, "b", range(2), delivered=1)
            assert contents([await b.expect("gateway_incoming") for _ in range(2)]) == [0, 1]
            proxy.freeze()  # no FIN: only the unanswered keepalive ping notices
            await gate.wait_connected(1)
            await relay_all(a, "b", range(2, 4), queued=1)
            back, kept = await returning(gate, "b", 4)
            assert contents(kept) == [0, 1, 2, 3]
            await back.quiet()


async def test_a_slow_reader_cut_off_loses_nothing(tmp_path: Path) -> None:
    settings = offline_settings(tmp_path, send_buffer_bytes=256 * 1024, max_frame_bytes=60_000)
    async with running(settings) as gate:
        sender = await gate.node("sender")
        slow = await gate.node("slow", rcvbuf=16 * 1024)
        slow.ws.transport.pause_reading()
        for n in range(200):  # 10 MB: past the slow node's 256 KiB and the kernel's socket buffers
            body = {"type": f"m{n}", "message": "x" * 50_000}
            await sender.send(type="gateway_relay", targetMeshId="slow", payload=body, id=f"r{n}")
            await sender.expect("gateway_ack", id=f"r{n}")
        await gate.wait_connected(1)  # cut off (1013)
        slow.ws.transport.resume_reading()
        assert (await slow.closed()).code == 1013
        back, kept = await returning(gate, "slow", 200)
        assert [f["payload"]["type"] for f in kept] == [f"m{n}" for n in range(200)]  # in order, once
        await back.quiet()


async def test_kept_frames_survive_a_restart(tmp_path: Path) -> None:
    settings = offline_settings(tmp_path)
    async with running(settings) as gate:
        a = await gate.node("a")
        await away(gate, "b")
        await relay_all(a, "b", range(3), queued=1)
    async with running(settings) as gate:
        assert (await gate.http.get("/health")).json()["queued"] == 3
        _, kept = await returning(gate, "b", 3)
        assert contents(kept) == [0, 1, 2]


async def test_under_a_host_server_frames_count_once_handed_over(tmp_path: Path) -> None:
    """A host app's own uvicorn (no confirmation pings): relays and offline delivery still work."""
    settings = offline_settings(tmp_path)
    app = gw.create_app(settings)
    options = {"host": "127.0.0.1", "port": 0, "log_level": "warning", "ws": "websockets-sansio"}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(TIMEOUT):
            while not server.started:
                await asyncio.sleep(0.005)
        addr = f"127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        async with httpx.AsyncClient(base_url=f"http://{addr}", timeout=TIMEOUT) as http:
            gate = Gate([addr], http)
            async with gate.stack:
                a, b = await gate.node("a"), await gate.node("b")
                await relay_all(a, "b", range(2), delivered=1)
                assert contents([await b.expect("gateway_incoming") for _ in range(2)]) == [0, 1]
                await b.ws.close()
                await relay_all(a, "b", range(2, 4), queued=1)
                _, kept = await returning(gate, "b", 2)
                assert contents(kept) == [2, 3]  # what was handed over before the close is not sent again
    finally:
        server.should_exit = True
        await task


class Model:
    """What each mesh must end up with: every relay to it and every broadcast of others
    while it had authenticated at least once, in the order the gateway accepted them."""

    def __init__(self, meshes: list[str]) -> None:
        self.expected: dict[str, list[str]] = {m: [] for m in meshes}
        self.known: set[str] = set()  # authenticated at least once


@st.composite
def scenarios(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    ops = st.tuples(
        st.sampled_from(["connect", "close", "kill", "relay", "broadcast"]), st.integers(0, 3), st.integers(0, 3)
    )
    return draw(st.lists(ops, min_size=5, max_size=25))


@hyp_settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=scenarios())
async def test_random_comings_and_goings_deliver_each_frame_once_in_order(
    tmp_path: Path, steps: list[tuple[str, int, int]]
) -> None:
    run = uuid.uuid4().hex[:8]
    names = [f"{run}-{i}" for i in range(4)]
    folder = tmp_path / run  # one gateway per example
    folder.mkdir()
    async with running(offline_settings(folder)) as gate:
        model = Model(names)
        nodes: dict[str, RawNode] = {}
        handled: dict[str, list[dict[str, Any]]] = {m: [] for m in names}
        for m in names:
            assert (await gate.register(m)).status_code == 200

        async def connect(m: str) -> None:
            node = await RawNode.open(gate)
            await node.auth(m)
            nodes[m] = node
            model.known.add(m)

        async def leave(m: str, how: str) -> None:
            node = nodes.pop(m)
            await node.quiesce()
            if how == "kill":
                node.kill()
            else:
                await node.close(drop_pongs=True)
            handled[m] += node.handled  # frames after its last pong count as not handled
            connected = len(nodes)
            async with asyncio.timeout(TIMEOUT):
                while (await gate.health())["connected"] != connected:
                    await asyncio.sleep(0.01)

        for n, (op, i, j) in enumerate(steps):
            m, other = names[i], names[j]
            if op == "connect":
                if m in nodes:  # replaces its live socket
                    await nodes[m].quiesce()
                    handled[m] += nodes[m].handled
                await connect(m)
            elif op in ("close", "kill") and m in nodes:
                await leave(m, op)
            elif op in ("relay", "broadcast") and m in nodes:
                sender = nodes[m]
                if op == "relay":
                    await sender.send(
                        type="gateway_relay", targetMeshId=other, payload={"type": "m", "message": f"s{n}"}, id=f"s{n}"
                    )
                    targets = [other] if other in model.known else []
                else:
                    await sender.send(type="gateway_broadcast", payload={"type": "m", "message": f"s{n}"}, id=f"s{n}")
                    targets = [t for t in model.known if t != m]
                await sender.answer(f"s{n}")  # accepted: the next step comes after it
                for target in targets:
                    model.expected[target].append(f"s{n}")
        for m in names:  # everyone comes back and catches up
            if m in model.known and m not in nodes:
                await connect(m)
        async with asyncio.timeout(TIMEOUT):
            for m, node in nodes.items():
                while len(handled[m]) + len(node.handled) < len(model.expected[m]):
                    await asyncio.sleep(0.01)
        for m, node in nodes.items():
            assert contents(handled[m] + node.handled) == model.expected[m], m


# --- Hypothesis: random and mutated frames never hurt anyone else -----------------------------


VALID_FRAMES = [
    {"type": "gateway_discover"},
    {"type": "gateway_relay", "targetMeshId": "peer", "payload": MESSAGE, "id": "1"},
    {"type": "gateway_broadcast", "payload": MESSAGE},
    {"type": "gateway_update_participants", "participants": [{"id": "1", "name": "a", "type": "user"}]},
    {"type": "gateway_update_rooms", "publicRooms": ["a"]},
    {"type": "gateway_auth", "meshId": "fuzz", "secret": "secret-fuzz"},
]


def json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    json_containers,
    max_leaves=10,
)


@st.composite
def fuzz_frames(draw: st.DrawFn) -> str | bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return json.dumps(draw(json_values))
    frame = dict(draw(st.sampled_from(VALID_FRAMES)))
    key = draw(st.sampled_from([*sorted(frame), "payload", "id", "targetMeshId", "participants"]))
    frame[key] = draw(json_values)
    text = json.dumps(frame)
    if kind == 3:  # byte-level mutation of a valid frame
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.text(max_size=3)) + text[cut + 1 :]
    return text


async def test_fuzzed_frames_never_hurt_other_meshes(tmp_path: Path) -> None:
    frames: list[str | bytes] = []

    @hyp_settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(fuzz_frames(), min_size=5, max_size=10))
    def collect(batch: list[str | bytes]) -> None:
        frames.extend(batch)

    collect()
    async with running(make_settings(tmp_path, rate_limit_per_min=1_000_000)) as gate:
        fuzz, peer, watcher = await gate.node("fuzz"), await gate.node("peer"), await gate.node("watcher")

        async def drain(node: Node) -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                async for _ in node.ws:
                    pass

        drains = [asyncio.create_task(drain(n)) for n in (peer, watcher)]
        decode_errors = {gw.INVALID_JSON, gw.INVALID_FRAME, gw.UNKNOWN_TYPE}
        predicted = [f for f in frames if isinstance(gw.decode_frame(f), gw.Error)]
        for frame in frames:
            await fuzz.ws.send(frame)
        await fuzz.send(type="gateway_relay", targetMeshId="fuzz", payload={}, id="the-end")
        answered = 0
        async with asyncio.timeout(60):
            while (frame := await fuzz.recv()).get("id") != "the-end" or frame["type"] != "gateway_ack":
                answered += frame["type"] == "error" and frame["code"] in decode_errors
        assert len(frames) >= 2000
        assert answered == len(predicted) > len(frames) // 3  # every bad frame got its one error
        for task in drains:
            task.cancel()
        # the fuzzing socket is still open, and everyone still relays
        other = await gate.node("other")
        await other.send(type="gateway_relay", targetMeshId="fuzz", payload={"type": "alive"}, id="z")
        while (frame := await other.recv())["type"] == "gateway_participants":
            pass
        assert frame == {"type": "gateway_ack", "id": "z", "delivered": 1, "queued": 0}
        assert (await gate.health())["connected"] == 4


# --- Embedding --------------------------------------------------------------------------------


async def test_mounted_gateway_relays_end_to_end(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    gateway = gw.Gateway(settings)

    @contextlib.asynccontextmanager
    async def host_lifespan(app: Starlette) -> AsyncIterator[None]:
        async with gateway.lifespan(app):
            yield

    host = Starlette(routes=[Mount("/mesh", routes=gateway.routes)], lifespan=host_lifespan)
    async with running(settings, host, prefix="/mesh") as gate:
        a, b = await gate.node("a"), await gate.node("b")
        await a.send(type="gateway_relay", targetMeshId="b", payload=MESSAGE, id="m")
        await b.expect("gateway_incoming", fromMeshId="a")
        await a.expect("gateway_ack", id="m", delivered=1)
        assert (await gate.health())["connected"] == 2


# --- Whole processes --------------------------------------------------------------------------


async def test_sigterm_closes_1012_and_exits(tmp_path: Path) -> None:
    async with process(tmp_path) as (proc, addr):
        async with httpx.AsyncClient(base_url=f"http://{addr}") as http:
            gate = Gate([addr], http)
            async with gate.stack:
                a = await gate.node("a")
                proc.send_signal(signal.SIGTERM)
                assert (await a.closed()).code == 1012
                async with asyncio.timeout(10):
                    while proc.poll() is None:
                        await asyncio.sleep(0.05)
        assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught
        assert "a" in stored_meshes(tmp_path)


async def test_sigterm_confirms_stores_then_closes_1012(tmp_path: Path) -> None:
    """SIGTERM: what a node confirms in the last 2 s is not sent again; the rest is stored; then 1012."""
    env = {"CONFIRM_INTERVAL_S": "30", "RATE_LIMIT_PER_MIN": "100000"}  # only the shutdown asks for confirmations
    async with process(tmp_path, **env) as (proc, addr), httpx.AsyncClient(base_url=f"http://{addr}") as http:
        gate = Gate([addr], http)
        async with gate.stack:
            a, confirming = await gate.node("a"), await gate.node("c")
            assert (await gate.register("b")).status_code == 200
            silent = await RawNode.open(gate)
            await silent.auth("b")
            silent.hold()  # never answers
            await relay_all(a, "b", range(3), delivered=1)
            await relay_all(a, "c", range(3), delivered=1)
            assert contents([await confirming.expect("gateway_incoming") for _ in range(3)]) == [0, 1, 2]
            proc.send_signal(signal.SIGTERM)
            assert (await confirming.closed()).code == 1012
            assert await silent.closed == 1012
            async with asyncio.timeout(10):
                while proc.poll() is None:
                    await asyncio.sleep(0.05)
    async with process(tmp_path, **env) as (proc, addr), httpx.AsyncClient(base_url=f"http://{addr}") as http:
        gate = Gate([addr], http)
        async with gate.stack:
            _, kept = await returning(gate, "b", 3)
            assert contents(kept) == [0, 1, 2]
            c, _ = await returning(gate, "c", 0)
            await c.quiet()  # confirmed before the 1012: never sent again


async def test_sigkill_keeps_what_was_stored(tmp_path: Path) -> None:
    async with process(tmp_path) as (proc, addr), httpx.AsyncClient(base_url=f"http://{addr}") as http:
        gate = Gate([addr], http)
        async with gate.stack:
            a = await gate.node("a")
            await away(gate, "b")
            await relay_all(a, "b", range(10), queued=1)  # acked: on disk
            proc.kill()
    async with process(tmp_path) as (proc, addr), httpx.AsyncClient(base_url=f"http://{addr}") as http:
        gate = Gate([addr], http)
        async with gate.stack:
            assert (await gate.http.get("/health")).json()["queued"] == 10
            back, kept = await returning(gate, "b", 10)
            assert contents(kept) == list(range(10))
            await back.quiet()


async def test_sigkill_repeats_at_most_the_last_confirm_interval(tmp_path: Path) -> None:
    """A crash may repeat only what was sent and not yet confirmed; confirmed kept frames are gone
    from the database, so a mesh catching up when the gateway dies resumes where it was."""
    async with process(tmp_path, CONFIRM_INTERVAL_S="0.05", RATE_LIMIT_PER_MIN="100000") as (proc, addr):
        async with httpx.AsyncClient(base_url=f"http://{addr}") as http:
            gate = Gate([addr], http)
            async with gate.stack:
                a = await gate.node("a")
                await away(gate, "b")
                await relay_all(a, "b", range(6), queued=1)
                assert (await gate.register("b")).status_code == 200
                b = await RawNode.open(gate)
                await b.auth("b")
                assert contents([await b.expect("gateway_incoming") for _ in range(6)]) == list(range(6))
                async with asyncio.timeout(TIMEOUT):  # confirmed, and the database has heard of it
                    while b.pending or kept_rows(tmp_path):
                        await asyncio.sleep(0.02)
                b.hold()
                await relay_all(a, "b", range(6, 8), delivered=1)  # sent, never confirmed
                assert contents([await b.expect("gateway_incoming") for _ in range(2)]) == [6, 7]
                proc.kill()
    async with process(tmp_path) as (proc, addr), httpx.AsyncClient(base_url=f"http://{addr}") as http:
        gate = Gate([addr], http)
        async with gate.stack:
            back = await gate.connect()
            await back.send(type="gateway_auth", meshId="b", secret="secret-b")
            await back.expect("gateway_auth_ok")
            await back.quiet()  # 0..5 were confirmed: not again (6, 7 were live, in memory: lost with it)


def test_bad_setting_stops_startup_with_one_line(tmp_path: Path) -> None:
    env = os.environ | {"RATE_LIMIT_PER_MIN": "lots", "REGISTRY_PATH": str(tmp_path / "r.json")}
    result = subprocess.run(
        [sys.executable, str(HERE / "gateway.py")], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "invalid setting RATE_LIMIT_PER_MIN='lots': Expected `int`, got `str` - at `$.RATE_LIMIT_PER_MIN`"
    ]


async def test_node_gateway_registry_is_upgraded_on_auth(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"node-secret-1").hexdigest()
    path = tmp_path / "registry.json"
    path.write_text(json.dumps([{"meshId": "old", "secretHash": digest, "name": "Old Mesh"}]))
    async with running(make_settings(tmp_path)) as gate:
        node = await gate.connect()
        await node.send(type="gateway_auth", meshId="old", secret="node-secret-1")
        await node.expect("gateway_auth_ok", meshId="old", name="Old Mesh")
        stored = stored_meshes(tmp_path)["old"]  # persisted right away
        assert stored.secret_hash.startswith("pbkdf2_sha256$")
        async with asyncio.timeout(2):  # and no copy of the old SHA-256 left in any file the gateway writes
            while any(digest.encode() in f.read_bytes() for f in tmp_path.glob("gateway.db*")):
                await asyncio.sleep(0.05)
        again = await gate.connect()
        await again.send(type="gateway_auth", meshId="old", secret="node-secret-1")
        await again.expect("gateway_auth_ok")


async def test_registry_survives_sigkill_mid_write(tmp_path: Path) -> None:
    """Kill the gateway (SIGKILL) while registrations stream in: the file always
    loads whole and holds every registration that was acknowledged."""
    acknowledged: set[str] = set()
    for round_ in range(3):
        async with process(tmp_path) as (proc, addr):
            async with httpx.AsyncClient(base_url=f"http://{addr}", timeout=5) as http:

                async def writer(worker: int, round_: int = round_) -> None:
                    for i in range(10_000):
                        mesh_id = f"r{round_}-w{worker}-{i}"
                        body = {"meshId": mesh_id, "secret": "secret-123", "name": "x" * 80}
                        response = await http.post("/register", json=body)
                        if response.status_code == 200:
                            acknowledged.add(mesh_id)

                tasks = [asyncio.create_task(writer(w)) for w in range(4)]
                async with asyncio.timeout(10):
                    while len([m for m in acknowledged if m.startswith(f"r{round_}-")]) < random.randint(20, 120):
                        await asyncio.sleep(0.01)
                proc.kill()
                await asyncio.gather(*tasks, return_exceptions=True)
        meshes = stored_meshes(tmp_path)  # the database opens whole
        assert acknowledged <= set(meshes)


def test_unreadable_registry_file_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text('[{"meshId": "a", "secretHash": ')
    env = os.environ | {"REGISTRY_PATH": str(path), "DB_PATH": str(tmp_path / "gateway.db"), "PORT": str(free_port())}
    result = subprocess.run(
        [sys.executable, str(HERE / "gateway.py")], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0 and "unreadable" in result.stderr
    assert path.read_text() == '[{"meshId": "a", "secretHash": '


async def test_hashing_workers_exit_with_a_killed_gateway(tmp_path: Path) -> None:
    def children(pid: int) -> list[int]:  # of every thread: a process started from a thread is that thread's child
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(child) for task in tasks for child in (task / "children").read_text().split()]

    async with process(tmp_path) as (proc, _):
        if not Path(f"/proc/{proc.pid}/task/{proc.pid}/children").exists():
            pytest.skip("no /proc children list on this system")
        helpers = children(proc.pid)  # the fork server, the resource tracker
        workers = [pid for helper in helpers for pid in children(helper)]  # the hashing processes
        assert len(workers) == 2, helpers
        workers += helpers
        proc.kill()
    async with asyncio.timeout(TIMEOUT):
        while any(
            Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
            for pid in workers
        ):
            await asyncio.sleep(0.1)


# --- Operations: start-up that never lies, draining, admin listing, logs ----------------------


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"REDIS_URL": "notaurl"}, "REDIS_URL='notaurl'"),
        ({"HOST": "999.1.1.1"}, "HOST='999.1.1.1'"),
        ({"DB_PATH": "/nonexistent-folder/gateway.db"}, "DB_PATH='/nonexistent-folder/gateway.db'"),
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, "Redis did not answer"),
    ],
)
def test_bad_start_ups_stop_with_one_line_and_never_say_ready(tmp_path: Path, env: dict[str, str], needle: str) -> None:
    full = os.environ | {"PORT": str(free_port()), "DB_PATH": str(tmp_path / "gateway.db")} | env
    result = subprocess.run(
        [sys.executable, str(HERE / "gateway.py")], env=full, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "ready" not in result.stderr + result.stdout


def test_a_taken_port_stops_start_up_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = os.environ | {"HOST": "127.0.0.1", "PORT": str(taken.getsockname()[1]), "DB_PATH": str(tmp_path / "g.db")}
        result = subprocess.run(
            [sys.executable, str(HERE / "gateway.py")], env=env, capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1 and result.stderr.strip().startswith("cannot listen on HOST='127.0.0.1'")


def test_version_and_help() -> None:
    version = subprocess.run(
        [sys.executable, str(HERE / "gateway.py"), "--version"], capture_output=True, text=True, timeout=30
    )
    assert version.stdout.strip() == f"mesh-gateway {gw.VERSION}"
    shown = subprocess.run(
        [sys.executable, str(HERE / "gateway.py"), "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    for name in Settings.__struct_fields__:
        assert name.upper() in shown
    assert "OFFLINE_TTL_S            86400" in shown


def test_tune_gc_freezes_start_up_and_collects_the_oldest_less_often() -> None:
    before = gc.get_threshold()
    try:
        gw.tune_gc()
        assert gc.get_freeze_count() > 0 and gc.get_threshold() == (700, 10, 100)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_python_gateway_py_loads_the_module_once() -> None:
    """Run as `python gateway.py`, the script hands over to the imported `gateway` module: the main
    that runs is that module's, so gateway_redis and every later `import gateway` see the same
    classes, not a second copy of the file (the double-import trap)."""
    code = (
        "import runpy, sys; import gateway; ran = []; real = gateway.main; "
        "gateway.main = lambda argv=None: ran.append(argv) or real(argv); "
        "sys.argv = ['gateway.py', '--version']; runpy.run_path('gateway.py', run_name='__main__'); "
        "print(len(ran), sys.modules['gateway'] is gateway)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=HERE)
    assert result.stdout.split() == ["mesh-gateway", gw.VERSION, "1", "True"], result.stderr


async def test_sigterm_drains_health_before_closing(tmp_path: Path) -> None:
    async with process(tmp_path) as (proc, addr), httpx.AsyncClient(base_url=f"http://{addr}") as http:
        gate = Gate([addr], http)
        async with gate.stack:
            a = await gate.node("a")
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(TIMEOUT):  # a load balancer sees 503 before the 1012
                while (health := await http.get("/health")).status_code != 503:
                    await asyncio.sleep(0.01)
            assert health.json()["draining"] is True and health.json()["ok"] is False
            assert (await a.closed()).code == 1012


async def test_admin_lists_meshes(tmp_path: Path) -> None:
    async with running(offline_settings(tmp_path, gateway_admin_token="tok")) as gate:
        admin = {"Authorization": "Bearer tok"}
        for m in ("a", "b", "c"):
            assert (
                await gate.http.post(
                    "/register", json={"meshId": m, "secret": f"secret-{m}", "name": f"Mesh {m}"}, headers=admin
                )
            ).status_code == 200
        node = await gate.connect()
        await node.send(type="gateway_auth", meshId="a", secret="secret-a")
        await node.expect("gateway_auth_ok")
        assert (await gate.http.get("/register")).status_code == 401
        listed = (await gate.http.get("/register", headers=admin)).json()
        assert [m["meshId"] for m in listed["meshes"]] == ["a", "b", "c"] and listed["next"] is None
        first = listed["meshes"][0]
        assert first["connected"] is True and first["name"] == "Mesh a" and first["lastSeen"] and first["created"]
        assert set(first) == {"meshId", "name", "created", "lastSeen", "kept", "connected"}  # never the hash
        page = (await gate.http.get("/register?limit=2", headers=admin)).json()
        assert [m["meshId"] for m in page["meshes"]] == ["a", "b"] and page["next"] == "b"
        rest = (await gate.http.get("/register?after=b", headers=admin)).json()
        assert [m["meshId"] for m in rest["meshes"]] == ["c"]


async def test_json_logs_carry_the_context(tmp_path: Path) -> None:
    async with process(tmp_path, LOG_FORMAT="json", RATE_LIMIT_PER_MIN="2") as (proc, addr):
        async with httpx.AsyncClient(base_url=f"http://{addr}") as http:
            gate = Gate([addr], http)
            async with gate.stack:
                a = await gate.node("a")
                for n in range(4):  # the first two pass (no ids: no acks ahead of the errors), the last two are refused
                    await a.send(type="gateway_broadcast", payload={"type": "m"}, **({"id": f"x{n}"} if n >= 2 else {}))
                await a.error("rate_limited", id="x2")
                await a.error("rate_limited", id="x3")
                bad = await gate.connect()
                await bad.send(type="gateway_auth", meshId="a", secret="wrong-wrong")
                await bad.closed()
                await a.ws.close()
                await gate.wait_connected(0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    lines = [json.loads(line) for line in (tmp_path / f"gateway-{addr.split(':')[1]}.log").read_text().splitlines()]
    assert all({"ts", "level", "event", "mesh_id", "conn", "ip", "code"} <= set(line) for line in lines)
    events = [line["event"] for line in lines]
    assert "ready" in events and "connect" in events and "auth_refused" in events
    assert events.count("rate_limited") == 1  # the first refusal of the burst, not every frame
    gone = next(line for line in lines if line["event"] == "disconnect" and line["mesh_id"] == "a")
    assert gone["code"] == 1000 and gone["ip"] == "127.0.0.1" and gone["message"].endswith(" s")  # and how long
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # one format for uvicorn's lines too


async def test_a_flood_of_refused_auths_logs_a_few_lines_a_second_and_counts_the_rest(tmp_path: Path) -> None:
    async with process(tmp_path, LOG_FORMAT="json", LOG_REFUSALS_PER_S="3") as (proc, addr):
        async with httpx.AsyncClient(base_url=f"http://{addr}") as http:
            gate = Gate([addr], http)
            async with gate.stack:
                for n in range(12):  # 10 checked and refused, then the IP is throttled: 12 refusals, 12 disconnects
                    bad = await gate.connect()
                    await bad.send(type="gateway_auth", meshId="nobody", secret="wrong-wrong")
                    answer = "Invalid credentials" if n < 10 else "Too many attempts"
                    await bad.expect("gateway_auth_error", message=answer)
                    await bad.closed()
                log_file = tmp_path / f"gateway-{addr.split(':')[1]}.log"
                async with asyncio.timeout(TIMEOUT):  # the count comes a second after the first line left out
                    while "lines_left_out" not in log_file.read_text():
                        await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    about = [line for line in lines if line["event"] in ("auth_refused", "disconnect")]
    left_out = [int(line["message"].split()[0]) for line in lines if line["event"] == "lines_left_out"]
    assert len(about) + sum(left_out) == 24  # every event is a line or counted in one
    stamps = [datetime.datetime.fromisoformat(line["ts"].rstrip("Z")).timestamp() for line in about]
    assert 0 < len(about) <= 3 * (math.floor(stamps[-1] - stamps[0]) + 2)  # at most 3 in any second


def scrape(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def test_metrics_move_and_stay_off_the_public_port(tmp_path: Path) -> None:
    metrics_port = free_port()
    limits = {"MAX_MESHES": "3", "REGISTER_PER_MIN": "5"}
    async with process(tmp_path, METRICS_PORT=str(metrics_port), OFFLINE_MAX_MESSAGES="2", **limits) as (_proc, addr):
        async with httpx.AsyncClient(base_url=f"http://{addr}") as http:
            gate = Gate([addr], http)
            async with gate.stack:
                before = scrape((await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text)
                assert (await http.get("/metrics")).status_code == 404  # the public port keeps its three routes
                a, _ = await gate.node("a"), await gate.node("b")
                await relay_all(a, "b", range(3), delivered=1)
                await a.send(type="gateway_relay", targetMeshId="nobody", payload={"type": "m"}, id="x")
                await a.error("target_offline")
                await away(gate, "c")
                await relay_all(a, "c", range(3), queued=1)  # one dropped past OFFLINE_MAX_MESSAGES
                bad = await gate.connect()
                await bad.send(type="gateway_auth", meshId="a", secret="wrong-wrong")
                await bad.closed()
                await gate.wait_connected(2)
                refused = [
                    await gate.register("d"),  # a fourth mesh, past MAX_MESHES
                    await http.post("/register", content=b"x" * 20_000, headers={"content-type": "application/json"}),
                    await gate.register("e"),  # the sixth POST, past REGISTER_PER_MIN
                    await http.get("/health", headers={"x-big": "h" * 17_000}),  # headers past 16 KiB
                ]
                assert [answer.status_code for answer in refused] == [507, 413, 429, 431]
                after = scrape((await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text)
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert moved['mesh_gateway_frames_in_total{type="gateway_relay"}'] == 7
    assert moved['mesh_gateway_frames_out_total{type="gateway_incoming"}'] == 3
    assert moved['mesh_gateway_errors_total{code="target_offline"}'] == 1
    assert moved['mesh_gateway_auth_failed_total{reason="invalid_credentials"}'] == 1
    assert moved["mesh_gateway_auth_ok_total"] == 3
    assert moved['mesh_gateway_connections_closed_total{code="1008"}'] == 1
    assert after["mesh_gateway_connections_open"] == 2 and after["mesh_gateway_meshes_connected"] == 2
    assert after["mesh_gateway_meshes_away"] == 1 and after["mesh_gateway_offline_queued"] == 2
    assert moved["mesh_gateway_offline_kept_total"] == 3 and moved["mesh_gateway_offline_dropped_total"] == 1
    assert after["mesh_gateway_meshes_registered"] == 3 and after["mesh_gateway_backplane_up"] == 1
    assert moved["mesh_gateway_bytes_in_total"] > 0 and moved["mesh_gateway_bytes_out_total"] > 0
    assert moved["mesh_gateway_queue_wait_seconds_count"] > 0
    for status in (413, 429, 431, 507):  # every limit an HTTP request can meet is counted
        assert moved[f'mesh_gateway_http_limited_total{{status="{status}"}}'] == 1
