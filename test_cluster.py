"""Scale-out: three `python gateway.py` processes sharing one real redis-server.
(Every scenario of test_gateway.py that takes the `gate` fixture also runs on a cluster.)"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import msgspec
import redis.asyncio as aioredis

import gateway_redis
from conftest import (
    MESSAGE,
    TIMEOUT,
    Gate,
    Node,
    RawNode,
    away,
    cluster,
    contents,
    make_settings,
    process,
    redis_server,
    relay_all,
    returning,
    running,
)


async def test_cluster_health_counts(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (gate, _, _):
        for i in range(3):
            await gate.node(f"m{i}")
        healths = await gate.healths()
        assert [h["connected"] for h in healths] == [1, 1, 1]
        assert [h["clusterConnected"] for h in healths] == [3, 3, 3]


async def test_cluster_mesh_moving_between_processes_gets_everything_once(tmp_path: Path) -> None:
    async with cluster(tmp_path, CONFIRM_INTERVAL_S="0.05") as (gate, _, _):
        a = await gate.node("a", addr=gate.addrs[0])
        await away(gate, "c")  # kept broadcasts too, across processes
        assert (await gate.register("b")).status_code == 200
        b = await RawNode.open(gate, gate.addrs[1])
        await b.auth("b")
        await gate.agree()
        b.hold()
        await relay_all(a, "b", range(3), delivered=1)
        assert contents([await b.expect("gateway_incoming") for _ in range(3)]) == [0, 1, 2]
        b.kill()  # on process 1, never confirmed
        await gate.wait_connected(1)
        await gate.agree()
        await relay_all(a, "b", range(3, 5), delivered=0, queued=1)
        await a.send(type="gateway_broadcast", payload={"type": "m", "message": "all"}, id="all")
        await a.expect("gateway_ack", id="all", queued=2)
        back = await gate.connect(addr=gate.addrs[2])  # through process 2
        await back.send(type="gateway_auth", meshId="b", secret="secret-b")
        await back.expect("gateway_auth_ok")
        kept = [await back.expect("gateway_incoming") for _ in range(6)]
        assert contents(kept) == [0, 1, 2, 3, 4, "all"]
        await back.quiet()
        _, kept = await returning(gate, "c", 1)
        assert contents(kept) == ["all"]


async def test_cluster_frames_sent_after_a_process_dies_are_kept(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (gate, redis, procs):
        a = await gate.node("a", addr=gate.addrs[0])
        b = await gate.node("b", addr=gate.addrs[1])
        procs[1].kill()  # b's process: its presence lingers until PRESENCE_TTL_S
        procs[1].wait()
        dead = gate.addrs.pop(1)
        client = aioredis.Redis.from_url(redis.url)
        async with asyncio.timeout(TIMEOUT):  # the crash is over: Redis dropped its subscription
            while len(await client.pubsub_channels("mesh:node:*")) != 2:
                await asyncio.sleep(0.01)
        await client.aclose()
        await relay_all(a, "b", range(3), delivered=0, queued=1)  # published to a gone process: kept
        _, kept = await returning(gate, "b", 3)
        assert contents(kept) == [0, 1, 2]
        del b, dead


async def test_killed_process_leaves_no_ghosts(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (gate, _, procs):
        doomed_addr = gate.addrs[2]
        alice = [{"id": "1", "name": "alice", "type": "user"}]
        a = await gate.node("a", addr=gate.addrs[0])
        b = await gate.node("b", addr=gate.addrs[1])
        ghost = await gate.node("ghost", participants=alice, addr=doomed_addr)
        for node in (a, b):
            assert (await node.expect("gateway_participants"))["remoteParticipants"][0]["meshId"] == "ghost"
        procs[2].kill()
        gate.addrs.remove(doomed_addr)
        # within PRESENCE_TTL_S (2 s) plus a sync, the others drop it and its participants
        for node in (a, b):
            frame = await node.recv(timeout=6)
            assert frame["remoteParticipants"] == [{"meshId": "ghost", "meshName": "Mesh ghost", "participants": []}]
        assert sorted(i["meshId"] for i in await a.discover()) == ["a", "b"]
        await a.send(type="gateway_relay", targetMeshId="ghost", payload=MESSAGE, id="g")
        await a.expect("gateway_ack", id="g", delivered=0, queued=1)  # away now: kept for it
        await gate.agree()
        # the mesh reconnects through a live process, and gets what was kept first
        again = await gate.node("ghost", addr=gate.addrs[0])
        await again.expect("gateway_incoming", fromMeshId="a")
        await b.send(type="gateway_relay", targetMeshId="ghost", payload=MESSAGE, id="back")
        await again.expect("gateway_incoming", fromMeshId="b")
        await b.expect("gateway_ack", id="back", delivered=1)
        del ghost


async def test_moved_mesh_leaves_no_presence_behind(tmp_path: Path) -> None:
    """A mesh that reconnects through another process, then leaves, is in no process's presence."""
    import redis.asyncio as aioredis

    async with cluster(tmp_path) as (gate, redis, _):
        b = await gate.node("b", addr=gate.addrs[2])
        old = await gate.node("a", addr=gate.addrs[0])
        new = await gate.node("a", addr=gate.addrs[1])
        assert (await old.closed()).code == 4000
        await new.ws.close()
        client = aioredis.Redis.from_url(redis.url)
        try:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    nodes = await client.smembers(gateway_redis.KEY_NODES)
                    holders = [n for n in nodes if await client.hexists(gateway_redis.KEY_PRESENCE + n.decode(), "a")]
                    if not holders:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        await gate.agree()
        assert [i["meshId"] for i in await b.discover()] == ["b"]


async def test_redis_outage_is_never_silent_and_recovers(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (gate, redis, _):
        p0, p1 = gate.addrs[0], gate.addrs[1]
        a = await gate.node("a", addr=p0)
        a2 = await gate.node("a2", addr=p0)
        b = await gate.node("b", addr=p1)
        redis.stop()
        async with asyncio.timeout(TIMEOUT):  # every /health turns 503 within a few seconds
            while True:
                codes = [(await gate.http.get(f"http://{addr}/health")).status_code for addr in gate.addrs]
                if codes == [503] * 3:
                    break
                await asyncio.sleep(0.05)
        # sockets stay open; same-process relay still delivered and acked
        await a.send(type="gateway_relay", targetMeshId="a2", payload=MESSAGE, id="local")
        await a2.expect("gateway_incoming", fromMeshId="a")
        await a.expect("gateway_ack", id="local", delivered=1)
        # a relay that needs Redis is refused with a reason, never dropped silently
        await a.send(type="gateway_relay", targetMeshId="b", payload=MESSAGE, id="far")
        await a.error("backplane_unavailable", id="far")
        # a broadcast reaches this process's meshes and is answered with the error
        await a.send(type="gateway_broadcast", payload=MESSAGE, id="all")
        await a2.expect("gateway_incoming", fromMeshId="a")
        await a.error("backplane_unavailable", id="all")
        assert sorted(i["meshId"] for i in await a.discover()) == ["a", "a2"]
        # no secret can be checked: auth and registration are refused
        node = await gate.connect(addr=p1)
        await node.send(type="gateway_auth", meshId="a", secret="secret-a")
        await node.expect("gateway_auth_error", message="Service unavailable")
        assert (await node.closed()).code == 1013
        assert (
            await gate.http.post(f"http://{p1}/register", json={"meshId": "n", "secret": "12345678", "name": "N"})
        ).status_code == 503
        assert (
            await gate.http.request("DELETE", f"http://{p1}/register", json={"meshId": "a", "secret": "secret-a"})
        ).status_code == 503
        await b.quiet()  # nothing reached b
        # Redis comes back (its append-only file keeps the registry): routing resumes by itself
        redis.start()
        await gate.agree()
        await a.send(type="gateway_relay", targetMeshId="b", payload=MESSAGE, id="far2")
        await b.expect("gateway_incoming", fromMeshId="a")
        await a.expect("gateway_ack", id="far2", delivered=1)
        c = await gate.node("c", addr=gate.addrs[2])
        await c.send(type="gateway_broadcast", payload=MESSAGE, id="all2")
        for node in (a, a2, b):
            await node.expect("gateway_incoming", fromMeshId="c")
        await c.expect("gateway_ack", id="all2", delivered=3)


async def test_redis_restarted_empty_gets_presence_back(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (gate, redis, _):
        a = await gate.node("a", addr=gate.addrs[0])
        b = await gate.node("b", addr=gate.addrs[1])
        redis.stop()
        shutil.rmtree(tmp_path / "appendonlydir")
        redis.start()  # empty: the processes re-announce their live meshes
        await gate.agree()
        async with asyncio.timeout(10):
            while sorted(i["meshId"] for i in await a.discover()) != ["a", "b"]:
                await asyncio.sleep(0.05)
        await a.send(type="gateway_relay", targetMeshId="b", payload=MESSAGE, id="x")
        await b.expect("gateway_incoming", fromMeshId="a")
        await a.expect("gateway_ack", id="x", delivered=1)


async def test_registry_file_is_imported_once(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"node-secret-1").hexdigest()
    entries = [{"meshId": m, "secretHash": digest, "name": m.upper()} for m in ("old1", "old2")]
    (tmp_path / "registry.json").write_text(json.dumps(entries))
    async with redis_server(tmp_path) as redis:
        env = {"REDIS_URL": redis.url}
        async with process(tmp_path, **env) as (_, p0), process(tmp_path, **env) as (_, p1):
            async with httpx.AsyncClient(timeout=TIMEOUT) as http:
                gate = Gate([p0, p1], http)
                async with gate.stack:
                    node = await gate.connect(addr=p1)
                    await node.send(type="gateway_auth", meshId="old1", secret="node-secret-1")
                    await node.expect("gateway_auth_ok", meshId="old1", name="OLD1")
                    gone = await http.request(
                        "DELETE", f"http://{p0}/register", json={"meshId": "old2", "secret": "node-secret-1"}
                    )
                    assert gone.status_code == 200
        async with process(tmp_path, **env) as (_, p2):  # a restart must not bring old2 back
            async with httpx.AsyncClient(timeout=TIMEOUT) as http:
                gate = Gate([p2], http)
                async with gate.stack:
                    node = await gate.connect()
                    await node.send(type="gateway_auth", meshId="old2", secret="node-secret-1")
                    await node.expect("gateway_auth_error", message="Invalid credentials")


async def test_database_registry_moves_into_redis_once(tmp_path: Path) -> None:
    async with running(make_settings(tmp_path)) as gate:  # a single-process gateway's database
        assert (await gate.register("solo")).status_code == 200
        assert (await gate.register("gone")).status_code == 200
    async with redis_server(tmp_path) as redis:
        env = {"REDIS_URL": redis.url}
        async with process(tmp_path, **env) as (_, addr), httpx.AsyncClient(timeout=TIMEOUT) as http:
            gate = Gate([addr], http)
            async with gate.stack:
                await gate.node("solo")  # its registration came along (register() again is a harmless 200)
                gone = await http.request(
                    "DELETE", f"http://{addr}/register", json={"meshId": "gone", "secret": "secret-gone"}
                )
                assert gone.status_code == 200
        async with process(tmp_path, **env) as (_, addr), httpx.AsyncClient(timeout=TIMEOUT) as http:
            gate = Gate([addr], http)
            async with gate.stack:  # a restart imports nothing twice: the deleted mesh stays deleted
                node = await gate.connect()
                await node.send(type="gateway_auth", meshId="gone", secret="secret-gone")
                await node.expect("gateway_auth_error", message="Invalid credentials")


async def test_thousand_meshes_over_three_processes(tmp_path: Path) -> None:
    """1,000 meshes spread over three processes all see and reach each other."""
    async with cluster(tmp_path) as (gate, _, _):
        count = 1000
        ids = [f"k{i}" for i in range(count)]
        for start in range(0, count, 100):
            responses = await asyncio.gather(*(gate.register(m) for m in ids[start : start + 100]))
            assert all(r.status_code == 200 for r in responses)

        async def join(mesh_id: str, addr: str) -> Node:
            node = await gate.connect(addr=addr)
            await node.send(type="gateway_auth", meshId=mesh_id, secret=f"secret-{mesh_id}")
            await node.expect("gateway_auth_ok", meshId=mesh_id)
            return node

        nodes: list[Node] = []
        for start in range(0, count, 100):
            nodes += await asyncio.gather(
                *(join(m, gate.addrs[i % 3]) for i, m in enumerate(ids[start : start + 100], start))
            )
        await gate.agree()
        assert len(await nodes[0].discover()) == count
        # a ring of relays, each to a mesh on another process
        await asyncio.gather(
            *(
                n.send(type="gateway_relay", targetMeshId=ids[(i + 1) % count], payload=MESSAGE, id=f"r{i}")
                for i, n in enumerate(nodes)
            )
        )

        async def two(node: Node) -> dict[str, dict[str, Any]]:  # its ack and its incoming, in either order
            frames = [await node.recv(), await node.recv()]
            return {f["type"]: f for f in frames}

        received = await asyncio.gather(*(two(n) for n in nodes))
        assert [r["gateway_incoming"]["fromMeshId"] for r in received] == [ids[(i - 1) % count] for i in range(count)]
        assert [r["gateway_ack"] for r in received] == [
            {"type": "gateway_ack", "id": f"r{i}", "delivered": 1, "queued": 0} for i in range(count)
        ]
        # and one broadcast reaches all 999 others
        await nodes[0].send(type="gateway_broadcast", payload=MESSAGE, id="all")
        frames = await asyncio.gather(*(n.expect("gateway_incoming", fromMeshId="k0") for n in nodes[1:]))
        assert len(frames) == count - 1
        await nodes[0].expect("gateway_ack", id="all", delivered=count - 1)


# --- Batched publishing ---------------------------------------------------------------------------


async def test_publish_groups_one_per_channel_without_reordering_any_receiver() -> None:
    """A drain turn's messages: one PUBLISH per channel, but a bus message (every process gets it)
    is never overtaken by, nor overtakes, a relay queued on the other side of it."""
    loop = asyncio.get_running_loop()
    bus, n1, n2 = gateway_redis.CHANNEL_BUS, gateway_redis.CHANNEL_NODE + "n1", gateway_redis.CHANNEL_NODE + "n2"

    def relay(n: int) -> gateway_redis.BusRelay:
        return gateway_redis.BusRelay(mesh_id="m", frame=msgspec.Raw(b"%d" % n))

    def broadcast(n: int) -> gateway_redis.BusBroadcast:
        return gateway_redis.BusBroadcast(node="n0", sender="s", frame=msgspec.Raw(b"%d" % n))

    queued: list[tuple[str, gateway_redis.BusItem]] = [
        (n1, relay(1)),
        (n2, relay(2)),
        (n1, relay(3)),
        (bus, broadcast(4)),
        (bus, gateway_redis.BusChanged("m", name="new")),
        (n1, relay(6)),
        (bus, broadcast(7)),
        (n2, relay(8)),
        (n2, relay(9)),
    ]
    batch = [(channel, item, loop.create_future()) for channel, item in queued]
    groups = gateway_redis.publish_groups(batch)
    assert [(channel, [queued.index((channel, i)) + 1 for i in items]) for channel, items, _ in groups] == [
        (n1, [1, 3]),
        (n2, [2]),
        (bus, [4, 5]),
        (n1, [6]),
        (bus, [7]),
        (n2, [8, 9]),
    ]
    future_of = {id(item): future for _, item, future in batch}
    assert all(futures == [future_of[id(i)] for i in items] for _, items, futures in groups)  # each sender's, once


async def test_publish_groups_split_past_batch_bytes_in_order() -> None:
    """A PUBLISH carries at most BATCH_BYTES of frames; the channel's next one follows it."""
    loop = asyncio.get_running_loop()
    n1, n2 = gateway_redis.CHANNEL_NODE + "n1", gateway_redis.CHANNEL_NODE + "n2"
    big = b"x" * (gateway_redis.BATCH_BYTES * 2 // 5)  # two fit in one PUBLISH, three do not
    items = [gateway_redis.BusRelay(mesh_id=str(i), frame=msgspec.Raw(big)) for i in range(5)]
    small = gateway_redis.BusRelay(mesh_id="small", frame=msgspec.Raw(b"{}"))
    batch = [(n1, item, loop.create_future()) for item in items] + [(n2, small, loop.create_future())]
    groups = gateway_redis.publish_groups(batch)
    assert [(channel, [i.mesh_id for i in group]) for channel, group, _ in groups] == [
        (n1, ["0", "1"]),
        (n1, ["2", "3"]),
        (n1, ["4"]),
        (n2, ["small"]),
    ]


async def publishes(client: aioredis.Redis) -> int:
    """PUBLISH commands Redis has run so far."""
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_publish", {}).get("calls", 0))


async def burst(node: RawNode, frames: list[dict[str, Any]]) -> None:
    """Every frame in one write, so the gateway reads (and publishes) many of them in one loop turn."""
    node.hold()
    for frame in frames:
        await node.send(**frame)
    node.release()


async def test_burst_to_several_processes_arrives_once_in_order_batched(tmp_path: Path) -> None:
    """Hundreds of relays to meshes on two other processes, and broadcasts between them, read in one
    go: each receiver gets each frame once, in the order sent; Redis ran far fewer PUBLISHes."""
    async with cluster(tmp_path) as (gate, redis, _):
        assert (await gate.register("a")).status_code == 200
        a = await RawNode.open(gate, gate.addrs[0])
        await a.auth("a")
        b = await gate.node("b", addr=gate.addrs[1])
        c = await gate.node("c", addr=gate.addrs[2])
        d = await gate.node("d", addr=gate.addrs[0])  # the sender's own process: delivered there, not published
        await gate.agree()
        client = aioredis.Redis.from_url(redis.url)
        before = await publishes(client)
        frames: list[dict[str, Any]] = []
        expected: dict[str, list[Any]] = {"b": [], "c": [], "d": []}
        for i in range(300):
            for target in ("b", "c"):
                frames.append(dict(type="gateway_relay", targetMeshId=target, payload={"type": "m", "message": i}))
                frames[-1]["id"] = f"{target}{i}"
                expected[target].append(i)
            if i % 25 == 0:
                frames.append(dict(type="gateway_broadcast", payload={"type": "m", "message": f"all{i}"}, id=f"all{i}"))
                for receiver in expected.values():
                    receiver.append(f"all{i}")
        await burst(a, frames)
        answers = {}
        for _ in frames:
            answer = await a.recv()
            assert answer["type"] == "gateway_ack" and answer["id"] not in answers, answer
            answers[answer["id"]] = answer["delivered"]
        assert answers == {f["id"]: 3 if f["type"] == "gateway_broadcast" else 1 for f in frames}
        for name, node in (("b", b), ("c", c), ("d", d)):
            received = [await node.expect("gateway_incoming", fromMeshId="a") for _ in expected[name]]
            assert contents(received) == expected[name]
            await node.quiet()  # nothing twice
        published = await publishes(client) - before
        await client.aclose()
        assert published < len(frames) / 5, published  # batched: one PUBLISH per channel per drain turn


async def test_burst_to_a_gone_process_is_kept_in_order(tmp_path: Path) -> None:
    """A batch of relays published to a process that died (PUBLISH counts 0): every relay in it
    is kept, acked as queued, and delivered once, in order, when the mesh is back."""
    async with cluster(tmp_path) as (gate, redis, procs):
        assert (await gate.register("a")).status_code == 200
        a = await RawNode.open(gate, gate.addrs[0])
        await a.auth("a")
        b = await gate.node("b", addr=gate.addrs[1])
        procs[1].kill()
        procs[1].wait()
        gate.addrs.pop(1)
        client = aioredis.Redis.from_url(redis.url)
        async with asyncio.timeout(TIMEOUT):  # Redis dropped its subscription; its presence lingers
            while len(await client.pubsub_channels("mesh:node:*")) != 2:
                await asyncio.sleep(0.01)
        await client.aclose()
        count = 200
        await burst(
            a,
            [
                dict(type="gateway_relay", targetMeshId="b", payload={"type": "m", "message": i}, id=f"r{i}")
                for i in range(count)
            ],
        )
        answers = [await a.expect("gateway_ack", delivered=0, queued=1) for _ in range(count)]
        assert sorted(f["id"] for f in answers) == sorted(f"r{i}" for i in range(count))
        back, kept = await returning(gate, "b", count)
        assert contents(kept) == list(range(count))
        await back.quiet()
        del b
