"""The benchmark scenarios. Each is `async def name(spec, ctx) -> Outcome`:
it launches a fresh server from `spec`, drives it with loadgen workers, and
measures. `cluster` is the relay workload again: on a single process it is
`relay`; on a cluster (several gateways, one redis-server) each pair's two
meshes connect to different processes, so every message crosses Redis.

Offline delivery: `relay-offline` and `fanout-max-offline` are `relay` and
`fanout-max` again, run on the gateway and on the gateway with
`OFFLINE_TTL_S=0`; `fanout-away` is the `fanout-max` load with some receivers
away; `catchup` and `kept-100k` keep frames for away meshes (and deliver
them).

Limits against abuse: `storm-participants` is `auth-storm` with and without
participants in every gateway_auth; `guess-flood` times legit authentications
alone and during floods of wrong-secret attempts "from" many addresses
(X-Forwarded-For); `preauth-memory` holds unauthenticated sockets that try to
make the gateway buffer (1 MiB frames, endless fragments, endless headers)
against its peak RSS, beside a legit mesh. Scenario options (`offline`,
`away_pct`, `participants`, `flood`, `attack`) come from run.py's sides."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen import registration
from servers import Cluster, Fleet, NodeSpec, Running, Server, ServerSpec, Spec, Store, busy_seconds
from wsclient import HttpClient

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Scale:
    relay_pairs: int = 10
    relay_window: int = 64
    relay_workers: int = 2
    warmup_s: float = 1.0
    measure_s: float = 5.0
    fanout_meshes: int = 100
    fanout_rate: float = 200.0
    fanout_window: int = 64
    conns: int = 10_000
    storm: int = 5_000
    register: int = 5_000
    register_clients: int = 4
    workers: int = 4  # processes for the connection-heavy scenarios
    settle_s: float = 1.0  # after 10k connects, before reading RSS
    timeout_s: float = 240.0  # bound on any one wait (connects, storms, registrations)
    check_rate: bool = True  # fail `fanout` below 95 % of the offered rate (too noisy for sub-second windows)
    away_pct: float = 10.0  # `fanout-away`: share of the receivers that are away
    catchup: int = 10_000  # `catchup`: frames kept for the one away mesh, then delivered
    kept: int = 100_000  # `kept-100k`: frames kept in all ...
    kept_meshes: int = 10  # ... for this many away meshes (kept / kept_meshes <= OFFLINE_MAX_MESSAGES)
    kept_senders: int = 4
    kept_frame_bytes: int = 1024  # `kept-100k`: each relay on the wire (`catchup` sends the usual ~300 B)
    keep_window: int = 256  # relays per sender awaiting their gateway_ack (sent once the frame is durable)
    grace_s: float = 0.5  # after the last catch-up frame: time for a frame sent twice to show up
    # Limits against abuse:
    storm_participants: int = 2_000  # `storm-participants`: meshes in the storm, with and without participants
    participants: int = 3  # ... each bringing this many in its gateway_auth
    probes: int = 200  # `guess-flood`: legit authentications ...
    probe_interval_s: float = 0.04  # ... one starting every this often, whatever the others do (8 s for 200)
    flood_rate: float = 300.0  # `flood`: wrong-secret attempts a second (`flood-max`: as fast as answered, ...
    flood_concurrency: int = 256  # ... with this many in flight; below MAX_PENDING_AUTH, 1,000)
    flood_targets: int = 100  # registered meshes the guesses are for (none of them a probe's)
    flood_ips: int = 4_096  # distinct X-Forwarded-For addresses they come "from"
    flood_lead_s: float = 0.5  # the flood runs this long before the first probe
    preauth_frames: int = 1_500  # `preauth-memory`: sockets starting a 1 MiB text frame before auth
    preauth_fragments: int = 500  # ... and sockets sending an ever-growing fragmented message
    preauth_headers: int = 100  # HTTP connections sending 4 MB of headers that never end
    preauth_header_bytes: int = 4_000_000
    preauth_interval_s: float = 0.1  # each frame/fragment socket sends 1 KiB this often
    preauth_hold_s: float = 3.0  # from the attack's start (the legit mesh relays, a second one connects)

    @property
    def universe(self) -> list[str]:
        """Every mesh id a scenario may use; the gateway gets them registered once."""
        kept = self.kept_meshes + self.kept_senders
        n = max(self.conns, self.storm + 1, self.fanout_meshes, 2 * self.relay_pairs, kept,
                self.storm_participants + 1, self.probes + self.flood_targets)  # fmt: skip
        return [mesh_id(i) for i in range(n)]


FULL = Scale()
QUICK = Scale(
    relay_pairs=2, relay_window=8, warmup_s=0.1, measure_s=0.3, fanout_meshes=6, fanout_rate=50.0,
    fanout_window=4, conns=40, storm=30, register=40, workers=2, settle_s=0.2, timeout_s=30.0, check_rate=False,
    catchup=200, kept=400, kept_meshes=4, kept_senders=2, keep_window=16, grace_s=0.1,
    storm_participants=20, probes=10, probe_interval_s=0.01, flood_rate=200.0, flood_concurrency=16,
    flood_targets=4, flood_ips=8, flood_lead_s=0.1, preauth_frames=20, preauth_fragments=5, preauth_headers=3,
    preauth_header_bytes=200_000, preauth_interval_s=0.01, preauth_hold_s=0.4,
)  # fmt: skip


def mesh_id(i: int) -> str:
    return f"m-{i:05d}"


@dataclass
class Context:
    tmp: Path
    scale: Scale
    seeds: dict[tuple[str, ...], Store] = field(default_factory=dict)  # server command -> the seeded store

    def store(self, spec: Spec, *, empty: bool = False) -> Store | None:
        """A private copy of the seeded store (or a new empty one) for one server run."""
        if not spec.uses_registry:
            return None
        assert isinstance(spec, ServerSpec)
        store = spec.fresh_store(self.tmp, spec.kind)
        if not empty and (seed := self.seeds.get(seed_key(spec))):
            seed.copy_to(store)
        return store


def seed_key(spec: Spec) -> tuple[str, ...]:
    """Servers started by the same command share one seed (the gateway with offline delivery off, too)."""
    return tuple(spec.argv)


@dataclass
class Outcome:
    metrics: dict[str, float] = field(default_factory=dict)
    server_cpu_pct: float = 0.0
    loadgen_cpu_pct: float = 0.0
    other_cpu_pct: float = 0.0  # the rest of the machine: kernel softirq (loopback TCP) and other processes
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class Meter:
    """The server's and the whole machine's CPU over one measured window, in % of one CPU
    (and, for a server of several processes, each process's: `parts_pct`)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.parts0, self.busy0, self.t0 = server.cpu_parts(), busy_seconds(), time.monotonic()
        self.cpu0 = server.cpu()

    def stop(self) -> Meter:
        wall = time.monotonic() - self.t0
        self.server_pct = 100 * (self.server.cpu() - self.cpu0) / wall
        self.busy_pct = 100 * (busy_seconds() - self.busy0) / wall
        parts = self.server.cpu_parts()
        self.parts_pct = {name: 100 * (parts[name] - self.parts0.get(name, 0.0)) / wall for name in parts}
        return self


def outcome(metrics: dict[str, float], meter: Meter, results: list[dict[str, Any]]) -> Outcome:
    loadgen = load_cpu(results)
    out = Outcome(metrics, meter.server_pct, loadgen, max(0.0, meter.busy_pct - meter.server_pct - loadgen))
    check(results, out)
    return out


def job(role: str, server: Server, ctx: Context, **params: Any) -> dict[str, Any]:
    host, port = server.endpoints[0]
    return {"role": role, "host": host, "port": port, "deadline_s": ctx.scale.timeout_s * 2 + 60, **params}


def chunks(items: list[Any], n: int) -> list[list[Any]]:
    n = max(1, min(n, len(items)))
    return [items[i::n] for i in range(n)]


def percentile(sorted_values: list[int], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))] / 1e6


def check(results: list[dict[str, Any]], outcome: Outcome) -> None:
    """Everything a worker saw that means the server misbehaved becomes an error (counts first, then examples)."""
    examples = []
    for r in results:
        if r["error_count"]:
            outcome.errors.append(f"{r['error_count']} errors (error frames, failed connects or auths)")
            examples += r["errors"][:3]
        if r.get("lost"):
            outcome.errors.append(f"lost {r['lost']} messages")
        if r["closes"]:
            outcome.errors.append(f"unexpected closes (code: count): {r['closes']}")
        if r.get("failed"):
            outcome.errors.append(f"{r['failed']} connections failed")
        if r.get("unfinished"):
            outcome.errors.append("a worker did not finish in time")
    outcome.errors += examples


async def until_done(fleet: Fleet, timeout: float) -> list[str]:
    """Wait for every worker's `done`; on timeout the results still say how far they got."""
    try:
        await fleet.expect("done", timeout)
        return []
    except TimeoutError:
        return [f"not finished within {timeout:.0f}s"]


async def measured_window(server: Server, fleet: Fleet, ctx: Context) -> tuple[list[dict[str, Any]], Meter]:
    """go, warm up, mark, measure, stop."""
    fleet.send("go")
    await asyncio.sleep(ctx.scale.warmup_s)
    fleet.send("mark")
    meter = Meter(server)
    await asyncio.sleep(ctx.scale.measure_s)
    meter.stop()
    return await fleet.results(), meter


def load_cpu(results: list[dict[str, Any]]) -> float:
    """All workers' CPU over their measured window, in % of one CPU."""
    wall_s = max(r["window_s"] for r in results)
    return 100 * sum(r["cpu_s"] for r in results) / wall_s if wall_s > 0 else 0.0


def latency(results: list[dict[str, Any]]) -> dict[str, float]:
    samples = sorted(s for r in results for s in r["samples"])
    return {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99), "max_ms": percentile(samples, 100)}


# --- Scenarios ---------------------------------------------------------------------


async def relay(spec: Spec, ctx: Context, *, offline: bool = False) -> Outcome:
    """Sender/receiver pairs. With several processes (a cluster), pair i's sender connects to
    process i and its receiver to process i+1 (mod n): every relay crosses the backplane.
    `offline`: the server must have offline delivery on (`away` in /health)."""
    s = ctx.scale
    pairs = [(mesh_id(2 * i), mesh_id(2 * i + 1)) for i in range(s.relay_pairs)]
    async with spec.launch(ctx.tmp, store=ctx.store(spec)) as server, Fleet(ctx.tmp, "relay") as fleet:
        if isinstance(server, Cluster):  # its registry is in Redis, empty: register over HTTP
            await register_meshes(server, ctx, [m for pair in pairs for m in pair], workers=1)
        ports = [port for _, port in server.endpoints]
        placed = {m: ports[(i + end) % len(ports)] for i, pair in enumerate(pairs) for end, m in enumerate(pair)}
        jobs = [
            job("relay", server, ctx, pairs=c, window=s.relay_window, ports=placed)
            for c in chunks(pairs, s.relay_workers)
        ]
        await fleet.start(jobs)
        spread = await server.connected() if isinstance(server, Cluster) else {}
        if isinstance(server, Cluster) and not await server.agree(len(placed)):
            raise RuntimeError(f"the processes' views of the cluster did not agree within 10 s: {spread}")
        results, meter = await measured_window(server, fleet, ctx)
        health = await server.health() or {}
    window = statistics.mean(r["window_s"] for r in results)
    lat = latency(results)
    rate = sum(r["count"] for r in results) / window
    metrics = {"msgs_per_s": rate, "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"]}
    metrics.update({f"cpu_pct_{name}": pct for name, pct in meter.parts_pct.items()})  # cluster: per process
    out = outcome(metrics, meter, results)
    if spread and spread != {port: list(placed.values()).count(port) for port in ports}:
        out.errors.append(f"meshes per process (port: /health connected) {spread}, not as placed")
    if offline:
        out.errors += offline_on(health)
    return out


def offline_on(health: dict[str, Any]) -> list[str]:
    """A gateway without offline delivery would make an on/off comparison compare a gateway with itself."""
    if "away" in health and "queued" in health:
        return []
    return [f"/health has no `away`/`queued` (offline delivery off or missing): {health}"]


async def _fanout(
    spec: Spec, ctx: Context, *, rate: float, away_pct: float = 0.0, offline: bool = False
) -> tuple[Outcome, list[dict[str, Any]]]:
    """One broadcaster, the other meshes receiving; `away_pct` of the receivers authenticate once and
    leave before the measurement (they are away: every broadcast is kept for them)."""
    s = ctx.scale
    meshes = [mesh_id(i) for i in range(s.fanout_meshes)]
    receivers = meshes[1:]
    n_away = max(1, round(len(receivers) * away_pct / 100)) if away_pct else 0
    away, receivers = receivers[len(receivers) - n_away :], receivers[: len(receivers) - n_away]
    errors: list[str] = []
    async with spec.launch(ctx.tmp, store=ctx.store(spec)) as server, Fleet(ctx.tmp, "fanout") as fleet:
        params = {"sender": meshes[0], "receivers": receivers, "rate": rate, "window": s.fanout_window, "away": away}
        await fleet.start([job("fanout", server, ctx, **params)])
        if away or offline:
            _, errors = await until_health(server, {"away": len(away)}, ctx)
        results, meter = await measured_window(server, fleet, ctx)
        health = await server.health() or {}
    deliveries = results[0]["count"] / results[0]["window_s"]
    metrics = {"deliveries_per_s": deliveries, "broadcasts_per_s": deliveries / len(receivers)}
    if away:
        metrics.update(away=len(away), queued_after=health.get("queued", float("nan")))
    out = outcome(metrics, meter, results)
    out.errors += errors
    if offline:
        out.errors += offline_on(health)
    if away and not health.get("queued"):
        out.errors.append(f"{len(away)} meshes away, yet /health says nothing was kept: {health}")
    return out, results


async def fanout(spec: Spec, ctx: Context) -> Outcome:
    out, results = await _fanout(spec, ctx, rate=ctx.scale.fanout_rate)
    out.metrics.update(latency(results))
    expected = ctx.scale.fanout_rate * (ctx.scale.fanout_meshes - 1)
    if ctx.scale.check_rate and out.metrics["deliveries_per_s"] < 0.95 * expected:
        out.errors.append(f"delivered {out.metrics['deliveries_per_s']:.0f}/s, below the offered {expected:.0f}/s")
    return out


async def fanout_max(spec: Spec, ctx: Context, *, offline: bool = False) -> Outcome:
    return (await _fanout(spec, ctx, rate=0.0, offline=offline))[0]


async def fanout_away(spec: Spec, ctx: Context, *, away_pct: float = 0.0) -> Outcome:
    """The `fanout-max` load with `away_pct` of the receivers away (0: all connected, the baseline)."""
    out, results = await _fanout(spec, ctx, rate=0.0, away_pct=away_pct, offline=True)
    out.metrics.update(latency(results))
    return out


def elapsed(results: list[dict[str, Any]]) -> float:
    """From the first worker's `go` to the last worker's `done`."""
    return max(r.get("done_t", float("nan")) for r in results) - min(r["mark_t"] for r in results)


async def conns(spec: Spec, ctx: Context) -> Outcome:
    """Idle authenticated meshes whose clients offer permessage-deflate, as Node's `ws` does."""
    s = ctx.scale
    meshes = [mesh_id(i) for i in range(s.conns)]
    async with spec.launch(ctx.tmp, store=ctx.store(spec)) as server, Fleet(ctx.tmp, "conns") as fleet:
        rss0 = server.rss()
        jobs = [job("connect", server, ctx, meshes=c, concurrency=64, deflate=True) for c in chunks(meshes, s.workers)]
        await fleet.start(jobs)
        fleet.send("go")
        meter = Meter(server)
        late = await until_done(fleet, s.timeout_s)
        await asyncio.sleep(s.settle_s)  # let the server settle (pending writes, auth bookkeeping)
        rss1, tree = server.rss(), server.rss_tree()
        health = await server.health() or {}
        meter.stop()
        results = await fleet.results()
    metrics = {
        "rss_kib_per_conn": (rss1 - rss0) / s.conns / 1024,
        "connect_s": elapsed(results),
        "deflate_accepted": sum(r.get("deflate_accepted", 0) for r in results),
        "rss_before_mib": rss0 / 2**20,
        "rss_after_mib": rss1 / 2**20,
        "rss_with_children_mib": tree / 2**20,  # plus helper processes (e.g. hashing workers)
    }
    out = outcome(metrics, meter, results)
    out.errors[:0] = late
    if health.get("connected") != s.conns:
        out.errors.append(f"/health connected={health.get('connected')}, expected {s.conns}")
    return out


async def auth_storm(spec: Spec, ctx: Context) -> Outcome:
    """A fresh server process over the persisted registry is the restart; then every mesh reconnects at once,
    while one mesh that got in first relays to itself back to back and records its worst round trip."""
    return await _storm(spec, ctx, ctx.scale.storm)


async def _storm(spec: Spec, ctx: Context, n: int, *, participants: int = 0) -> Outcome:
    """`n` meshes connect and authenticate at once (meshes 0..n-1; mesh n is the watcher). With
    `participants`, each brings that many in its gateway_auth and the storm is over when every mesh
    has been sent every other mesh's group (`settled_s`); without, when all are authenticated."""
    s = ctx.scale
    meshes = [mesh_id(i) for i in range(n)]
    async with (
        spec.launch(ctx.tmp, store=ctx.store(spec)) as server,
        Fleet(ctx.tmp, "watcher") as watcher,
        Fleet(ctx.tmp, "storm") as storm,
    ):
        # The watcher's worst round trip is the storm's stall: it may last as long as the storm itself is
        # allowed to (the reference Node gateway parses its whole registry per auth, back to back).
        await watcher.start([job("watcher", server, ctx, mesh=mesh_id(n), echo_timeout_s=s.timeout_s)])
        # The storm runs niced so that the watcher's own process is not what stalls.
        params = {"nice": 5, "connect_timeout_s": s.timeout_s, "retries": 2}
        if participants:
            params |= {"participants": participants, "expect_groups": n - 1}
        await storm.start([job("connect", server, ctx, meshes=c, **params) for c in chunks(meshes, s.workers)])
        watcher.send("go")
        await asyncio.sleep(0.2)  # a baseline of quiet round trips
        storm.send("go")
        meter = Meter(server)
        late = await until_done(storm, s.timeout_s)
        groups: list[dict[str, Any]] = []
        if participants and not late:
            try:  # every mesh has every other mesh's group
                groups = list(await asyncio.gather(*(w.event("groups", s.timeout_s) for w in storm.workers)))
            except TimeoutError:
                late.append(f"not every mesh got all {n - 1} participant groups within {s.timeout_s:.0f}s")
        meter.stop()
        storm_results = await storm.results()
        watch = (await watcher.results())[0]
    authed = elapsed(storm_results)
    start = min(r["mark_t"] for r in storm_results)
    metrics = {
        "all_authed_s": authed,
        "settled_s": max(g["t"] for g in groups) - start if groups else authed if not participants else float("nan"),
        "max_stall_ms": max(watch["samples"], default=0) / 1e6,
        "watcher_pings": watch["count"],
        "reconnects": sum(r["reconnects"] for r in storm_results),  # connects refused/reset, retried after 0.5 s
    }
    if participants:
        sent = sum(r["groups"] for r in storm_results)
        metrics |= {
            "groups": sent,  # participant groups received by the storm's meshes, in all
            "groups_again": sent - n * (n - 1),  # received more than once (a greeting and an announcement)
            "group_frames": sum(r["group_frames"] for r in storm_results),
            "group_mb": sum(r["group_bytes"] for r in storm_results) / MB,
            "meshes_complete": sum(r["groups_complete"] for r in storm_results),
            "meshes_verified": sum(r["groups_verified"] for r in storm_results),  # by mesh id (loadgen VERIFY_EVERY)
        }
    out = outcome(metrics, meter, storm_results)
    out.errors[:0] = late
    if participants and not late and metrics["meshes_complete"] != n:
        out.errors.append(f"{metrics['meshes_complete']}/{n} meshes got every other mesh's participants")
    verifying = sum(r["groups_verifying"] for r in storm_results) if participants else 0
    if participants and not late and metrics["meshes_verified"] != verifying:
        out.errors.append(f"{metrics['meshes_verified']}/{verifying} meshes got every other mesh's group by mesh id")
    check([watch], out)
    return out


async def storm_participants(spec: Spec, ctx: Context, *, participants: bool = False) -> Outcome:
    """The auth storm with `storm_participants` meshes, each bringing `participants` (the scale's) or none."""
    s = ctx.scale
    return await _storm(spec, ctx, s.storm_participants, participants=s.participants if participants else 0)


async def register(spec: Spec, ctx: Context) -> Outcome:
    """Registrations into an empty registry from `register_clients` concurrent keep-alive connections."""
    s = ctx.scale
    meshes = [f"r-{i:05d}" for i in range(s.register)]
    async with spec.launch(ctx.tmp, store=ctx.store(spec, empty=True)) as server, Fleet(ctx.tmp, "register") as fleet:
        # One process holding the clients' keep-alive connections: cheaper than one process each.
        await fleet.start([job("register", server, ctx, meshes=meshes, conns=s.register_clients)])
        fleet.send("go")
        meter = Meter(server)
        late = await until_done(fleet, s.timeout_s)
        meter.stop()
        results = await fleet.results()
    seconds = elapsed(results)
    out = outcome({"seconds": seconds, "per_s": s.register / seconds}, meter, results)
    out.errors[:0] = late
    if (ok := sum(r["ok"] for r in results)) != s.register:
        out.errors.append(f"{ok}/{s.register} registrations acknowledged")
    return out


# --- Offline delivery -----------------------------------------------------------------


async def until_health(
    server: Server, want: dict[str, int], ctx: Context, *, at_least: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """Poll /health (bounded) until each field in `want` has that value (or more, with `at_least`)."""
    deadline = time.monotonic() + min(10.0, ctx.scale.timeout_s / 4)
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        health = await server.health() or {}
        got = {k: health.get(k) for k in want}
        if all(isinstance(v, int) and (v >= want[k] if at_least else v == want[k]) for k, v in got.items()):
            return health, []
        await asyncio.sleep(0.02)
    return health, [f"/health never reached {want}{' or more' if at_least else ''}: {health}"]


MB = 1e6  # the offline-delivery scenarios report memory in MB, as their targets are set


class RssPeak:
    """The server's RSS before a phase and its peak during it, sampled every few ms in the background."""

    def __init__(self, server: Server, interval_s: float = 0.002) -> None:
        self.server, self.interval_s = server, interval_s
        self.before = self.peak = self.after = 0

    async def __aenter__(self) -> RssPeak:
        self.before = self.peak = self.server.rss()
        self.task = asyncio.get_running_loop().create_task(self.sample())
        return self

    async def sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.server.rss())
            await asyncio.sleep(self.interval_s)

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        self.after = self.server.rss()
        self.peak = max(self.peak, self.after)


async def keep(
    server: Server, fleet: Fleet, ctx: Context, *, away: list[str], senders: list[str], per_target: int, **params: Any
) -> tuple[dict[str, float], list[str], Meter]:
    """Make `away` meshes away, then relay `per_target` frames to each (with ids) until every one is acked
    as kept (`queued: 1`) and /health counts them; RSS before and after, keep time, CPU while keeping."""
    s = ctx.scale
    total = per_target * len(away)
    params |= {"away": away, "senders": senders, "per_target": per_target, "window": s.keep_window}
    await fleet.start([job("keep", server, ctx, grace_s=s.grace_s, **params)])
    health, errors = await until_health(server, {"away": len(away), "queued": 0}, ctx)
    if errors:  # no offline delivery: nothing would be kept
        return {}, errors, Meter(server).stop()
    async with RssPeak(server, interval_s=0.01) as rss:
        meter = Meter(server)
        fleet.send("go")
        try:
            done = (await fleet.expect("done", s.timeout_s))[0]
        except TimeoutError:
            return {}, [f"keeping {total} frames did not finish within {s.timeout_s:.0f}s"], meter.stop()
        meter.stop()
        health, late = await until_health(server, {"queued": total}, ctx, at_least=True)
    await asyncio.sleep(s.settle_s)
    metrics = {
        "keep_s": done["keep_s"],
        "kept_per_s": total / done["keep_s"],
        "kept": done["kept"],
        "queued": health.get("queued", float("nan")),
        "rss_before_mb": rss.before / MB,
        "rss_after_mb": server.rss() / MB,
        "rss_growth_mb": (server.rss() - rss.before) / MB,
        "rss_peak_growth_mb": (rss.peak - rss.before) / MB,
    }
    if isinstance(server, Running) and server.store is not None:
        metrics["db_mb"] = server.store.size() / MB  # the database, its WAL and shared-memory files
    if done["kept"] != total:
        late.append(f"{done['kept']}/{total} relays acked as kept (queued: 1)")
    return metrics, late, meter


async def come_back(
    server: Server, fleet: Fleet, ctx: Context, *, total: int, again: bool = False
) -> tuple[dict[str, float], list[str], Meter]:
    """The kept-for meshes authenticate again (`catchup`): frames/s from gateway_auth_ok until the last
    of `total`, each once and in order; the server's RSS at its peak meanwhile. `again`: once the
    meshes have confirmed everything (answered a ping sent after it), they leave and come back once
    more, and must receive nothing."""
    s = ctx.scale
    async with RssPeak(server) as rss:
        meter = Meter(server)
        fleet.send("catchup")
        caught = (await fleet.expect("caught_up", s.timeout_s + 60))[0]
        meter.stop()
    # /health stops counting a mesh's kept frames when it authenticates (not when they are confirmed).
    _, errors = await until_health(server, {"queued": 0, "away": 0}, ctx)
    caught |= (await fleet.expect("checked", s.grace_s + 10))[0]  # after a grace: any frame sent twice
    metrics = {
        "catchup_frames_per_s": total / caught["catchup_s"] if caught["catchup_s"] else 0.0,
        "catchup_s": caught["catchup_s"],
        "first_frame_ms": caught["first_s"] * 1000,  # gateway_auth_ok to the first kept frame (the slowest mesh)
        "catchup_rss_growth_mb": (rss.peak - rss.before) / MB,
        "catchup_rss_before_mb": rss.before / MB,
        "catchup_rss_peak_mb": rss.peak / MB,
        "received": caught["received"],
        "duplicates": caught["duplicates"],
    }
    if caught["in_order"] != total or caught["received"] != total:
        errors.append(f"catch-up: {caught['received']} frames received, {caught['in_order']} of {total} in order")
    if caught["duplicates"] or caught["gaps"]:
        errors.append(f"catch-up: {caught['duplicates']} sent again, {caught['gaps']} gaps or reorderings")
    if caught["before_auth"]:
        errors.append(f"catch-up: {caught['before_auth']} frames before gateway_auth_ok")
    if again:
        fleet.send("again")
        second = (await fleet.expect("again", s.grace_s + 30))[0]
        metrics |= {"resent_after_confirm": second["resent"], "confirm_wait_ms": second["confirm_wait_s"] * 1000}
        if second["resent"]:
            errors.append(f"confirmed frames sent again on the next auth: {second['resent']} (seqs {second['first']})")
    return metrics, errors, meter


async def catchup(spec: Spec, ctx: Context) -> Outcome:
    """One mesh authenticates once and leaves; `catchup` frames are kept for it; it authenticates again:
    frames/s from gateway_auth_ok to the last one, every one once and in order, and the RSS it costs."""
    s = ctx.scale
    target, sender = mesh_id(0), mesh_id(1)
    async with spec.launch(ctx.tmp, store=ctx.store(spec)) as server, Fleet(ctx.tmp, "catchup") as fleet:
        metrics, errors, meter = await keep(server, fleet, ctx, away=[target], senders=[sender], per_target=s.catchup)
        if not errors:
            back, errors, meter = await come_back(server, fleet, ctx, total=s.catchup, again=True)
            metrics |= back
        results = await fleet.results()
    if "received" in metrics:
        metrics["pings"] = results[0]["pings"]  # the gateway's pings the returning mesh answered
    out = outcome(metrics, meter, results)
    out.errors[:0] = errors
    return out


async def kept_100k(spec: Spec, ctx: Context) -> Outcome:
    """`kept` frames of ~1 KB kept for `kept_meshes` away meshes: the RSS stays flat (they live in the
    database). Then every one of them comes back at once and gets its mailbox (`catchup_*` figures)."""
    s = ctx.scale
    away = [mesh_id(i) for i in range(s.kept_meshes)]
    senders = [mesh_id(s.kept_meshes + i) for i in range(s.kept_senders)]
    per_target = s.kept // s.kept_meshes
    async with spec.launch(ctx.tmp, store=ctx.store(spec)) as server, Fleet(ctx.tmp, "kept") as fleet:
        params = {"frame_bytes": s.kept_frame_bytes, "returning": len(away)}
        metrics, errors, meter = await keep(
            server, fleet, ctx, away=away, senders=senders, per_target=per_target, **params
        )
        if not errors:
            back, errors, _ = await come_back(server, fleet, ctx, total=per_target * len(away))
            metrics |= back
        results = await fleet.results()
    out = outcome(metrics, meter, results)  # CPU: while keeping
    out.errors[:0] = errors
    return out


# --- Limits against abuse ---------------------------------------------------------------


def counted(values: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(values.items())) or "none"


async def guess_flood(spec: Spec, ctx: Context, *, flood: str = "") -> Outcome:
    """Legit authentications (`probes`, one starting every `probe_interval_s`: connect + upgrade +
    gateway_auth until gateway_auth_ok, from 127.0.0.1) alone, or during a flood of wrong-secret
    gateway_auth attempts for `flood_targets` other registered meshes, each "from" one of `flood_ips`
    addresses (X-Forwarded-For, believed from 127.0.0.1 by default): `flood="paced"` at `flood_rate`
    a second, `"max"` as fast as the gateway answers `flood_concurrency` at a time, `"spread"` paced
    but each guess for a meshId of its own that nobody registered (so no meshId's bucket ever
    empties: only the per-IP ones can throttle, after 10 guesses from an address). The gateway runs
    with the production AUTH_FAILURES_PER_MIN and MAX_PENDING_AUTH (run.py's `gateway-limits`).
    Reports the legit auth latency (also split: probes started before the first "Too many attempts",
    while every guess was checked, and after), and how many guesses a second the gateway checked
    and how many it turned away unchecked."""
    s = ctx.scale
    universe = s.universe
    probes, targets = universe[: s.probes], universe[-s.flood_targets :]
    async with (
        spec.launch(ctx.tmp, store=ctx.store(spec)) as server,
        Fleet(ctx.tmp, "probe") as prober,
        Fleet(ctx.tmp, "guess") as flooder,
    ):
        await prober.start([job("probe", server, ctx, meshes=probes, interval_s=s.probe_interval_s)])
        if flood:  # niced, like the storm: the probes' own process must not be what is slow
            rate = 0.0 if flood == "max" else s.flood_rate
            params = {"targets": [] if flood == "spread" else targets, "ips": s.flood_ips, "rate": rate,
                      "concurrency": s.flood_concurrency, "nice": 5}  # fmt: skip
            await flooder.start([job("guess", server, ctx, **params)])
        meter = Meter(server)
        if flood:
            flooder.send("go")
            await asyncio.sleep(s.flood_lead_s)
        prober.send("go")
        late = await until_done(prober, s.timeout_s)
        meter.stop()
        results = await prober.results()
        guessed = (await flooder.results())[0] if flood else None
    probe = results[0]
    samples = sorted(probe["samples"])
    metrics = {
        "p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99), "max_ms": percentile(samples, 100),
        "probes": len(samples),
    }  # fmt: skip
    # Where the time goes (p99 of each phase, client side): TCP connect; until the 101 (the server's
    # accept and upgrade); from the 101 to gateway_auth_ok (the auth frame and its check).
    for i, phase in enumerate(("tcp", "upgrade", "after_upgrade")):
        metrics[f"p99_{phase}_ms"] = percentile(sorted(int(p[i] * 1e9) for p in probe["phases"]), 99)
    errors: list[str] = []
    if guessed is None:  # no flood: both of the flood's phases are the whole window
        metrics |= {"p99_checking_ms": metrics["p99_ms"], "p99_throttling_ms": metrics["p99_ms"]}
    else:
        window = guessed["window_s"]
        answered = guessed["checked"] + guessed["throttled"]
        throttling_from = guessed["mark_t"] + guessed["first_throttled_s"] if guessed["first_throttled_s"] else 1e18
        checking = sorted(n for t, n in zip(probe["starts"], probe["samples"], strict=True) if t < throttling_from)
        throttling = sorted(n for t, n in zip(probe["starts"], probe["samples"], strict=True) if t >= throttling_from)
        bucket = int(guessed["first_throttled_s"] * 10) if guessed["first_throttled_s"] else len(guessed["timeline"])
        steady = guessed["timeline"][bucket + 1 :]  # whole 100 ms buckets after the first throttled answer
        metrics |= {
            "attempts_per_s": sum(guessed[k] for k in ("checked", "throttled", "refused", "unanswered", "other"))
            / window,
            "checked_per_s": guessed["checked"] / window,
            "throttled_per_s": guessed["throttled"] / window,
            "throttled_share": guessed["throttled"] / answered if answered else float("nan"),
            "checked": guessed["checked"], "throttled": guessed["throttled"],
            "refused": guessed["refused"], "unanswered": guessed["unanswered"],
            "first_throttled_ms": guessed["first_throttled_s"] * 1000,
            # once the throttle holds: what is still checked (the buckets' refill) and turned away, per second
            "steady_checked_per_s": sum(c for c, _ in steady) / (len(steady) / 10) if steady else float("nan"),
            "steady_throttled_per_s": sum(t for _, t in steady) / (len(steady) / 10) if steady else float("nan"),
            "flood_s": window,
            "p99_checking_ms": percentile(checking, 99), "probes_checking": len(checking),
            "p99_throttling_ms": percentile(throttling, 99), "probes_throttling": len(throttling),
        }  # fmt: skip
        if guessed["refused"]:
            errors.append(f"{guessed['refused']} guesses refused at the upgrade ({counted(guessed['refused_status'])})")
        flood_out = Outcome()
        check([guessed], flood_out)  # unexpected answers to a guess
        errors += flood_out.errors
    out = outcome(metrics, meter, results)
    out.errors[:0] = late + errors
    if guessed is not None:
        out.loadgen_cpu_pct = load_cpu([*results, guessed])
    return out


async def preauth_memory(spec: Spec, ctx: Context, *, attack: bool = False) -> Outcome:
    """Sockets that never authenticate and try to make the gateway buffer, against its peak RSS; meanwhile
    a legit mesh connects (timed), relays to itself (one every 5 ms, latency), and a second connects.

    With `attack`: `preauth_frames` WebSockets upgrade and wait (all open before the legit mesh
    connects), then each starts a text frame announcing 1 MiB and sends 1 KiB of it every
    `preauth_interval_s` (100 ms), `preauth_fragments` send a fragmented message, 1 KiB per fragment
    as often, and
    `preauth_headers` HTTP connections send an upgrade request whose headers never end (8 KiB every
    5 ms, up to `preauth_header_bytes`). The gateway must close each frame/fragment socket with 1009
    (a message over 16 KiB before auth) and answer each header connection 431."""
    s = ctx.scale
    legit, second = mesh_id(0), mesh_id(1)
    frames, fragments, headers = (s.preauth_frames, s.preauth_fragments, s.preauth_headers) if attack else (0, 0, 0)
    errors: list[str] = []
    async with (
        spec.launch(ctx.tmp, store=ctx.store(spec)) as server,
        Fleet(ctx.tmp, "legit") as legits,
        Fleet(ctx.tmp, "preauth") as attackers,
    ):
        await legits.start([job("legit", server, ctx, mesh=legit, second=second, interval_s=0.005)])
        if attack:
            params = {"frames": frames, "fragments": fragments, "headers": headers, "announce": 1 << 20,
                      "chunk": 1024, "interval_s": s.preauth_interval_s, "header_chunk": 8192,
                      "header_interval_s": 0.005,
                      "header_total": s.preauth_header_bytes, "concurrency": 100, "nice": 5}  # fmt: skip
            await attackers.start([job("preauth", server, ctx, **params)])
        async with RssPeak(server) as rss:
            meter = Meter(server)
            holding: dict[str, Any] = {}
            if attack:
                attackers.send("go")
                holding = await attackers.workers[0].event("holding", s.timeout_s)
            pending = await server.health() or {}
            legits.send("go")
            first = await legits.workers[0].event("connected", 30)
            await asyncio.sleep(s.preauth_hold_s / 4)  # relaying beside the open, silent sockets
            fired = time.monotonic()
            if attack:
                attackers.send("fire")
            await asyncio.sleep(0.05)
            legits.send("connect")
            second_ok = await legits.workers[0].expect("connected", 30)
            await asyncio.sleep(max(0.0, s.preauth_hold_s - (time.monotonic() - fired)))
            meter.stop()
            results = await legits.results()
            hit = (await attackers.results())[0] if attack else None
    lat = latency(results)
    connect_ms = results[0].get("connect_ms", [])
    metrics = {
        "rss_before_mb": rss.before / MB, "rss_peak_mb": rss.peak / MB, "rss_growth_mb": (rss.peak - rss.before) / MB,
        "relay_p50_ms": lat["p50_ms"], "relay_p99_ms": lat["p99_ms"], "relay_max_ms": lat["max_ms"],
        "relays": results[0]["count"], "connect_ms": max(connect_ms, default=float("nan")),
        # the first legit mesh beside the silent unauthenticated sockets; the second as they start sending
        "connect_first_ms": connect_ms[0] if connect_ms else float("nan"),
        "connect_second_ms": connect_ms[1] if len(connect_ms) > 1 else float("nan"),
        "open_before_auth": holding.get("frames", 0) + holding.get("fragments", 0),
    }  # fmt: skip
    if not (first.get("ok") and second_ok.get("ok")):
        errors.append("the legit meshes could not connect")
    if hit is not None:
        answers = hit["answers"]
        metrics |= {
            "frames_1009": answers["frames"].get("1009", 0), "fragments_1009": answers["fragments"].get("1009", 0),
            "headers_431": answers["headers"].get("431", 0),
            # reset (RST) before any answer: cut off, but the 431 was lost (the gateway closed with the
            # client's unread header bytes in its receive buffer)
            "headers_reset": answers["headers"].get("reset", 0),
            "frame_sent_max_kib": hit["sent_before_max"]["frames"] / 1024,
            "fragment_sent_max_kib": hit["sent_before_max"]["fragments"] / 1024,
            "header_sent_max_kib": hit["sent_before_max"]["headers"] / 1024,
            "frame_closed_max_ms": hit["answer_ms_max"]["frames"],
            "fragment_closed_max_ms": hit["answer_ms_max"]["fragments"],
            "header_answered_max_ms": hit["answer_ms_max"]["headers"],
        }  # fmt: skip
        if hit["refused_status"] or hit["open_failed"]:
            errors.append(f"attack sockets refused ({counted(hit['refused_status'])}) or failed ({hit['open_failed']})")
        expected = (("frames", "1009", frames), ("fragments", "1009", fragments), ("headers", "431", headers))
        for kind, want, n in expected:
            got = dict(answers[kind])
            if kind == "headers":  # a reset before the 431: cut off all the same (counted, logged below)
                n -= got.pop("reset", 0)
            if got != ({want: n} if n else {}):
                errors.append(f"{kind}: expected {n} x {want}, got {counted(answers[kind])}")
        if answers["headers"].get("reset"):  # not buffered (cut off), but not answered either: a figure, logged
            log.warning("preauth-memory: %d of %d header connections reset before their 431 arrived",
                        answers["headers"]["reset"], headers)  # fmt: skip
        if pending.get("connected") != 0:
            errors.append(f"/health with only unauthenticated sockets open: {pending}")
    out = outcome(metrics, meter, results)
    out.errors[:0] = errors
    if hit is not None:
        out.loadgen_cpu_pct = load_cpu([*results, hit])
    return out


# --- Setup ---------------------------------------------------------------------------


async def seed_registry(spec: Spec, ctx: Context) -> None:
    """Register every mesh of the universe once over HTTP, stop that server cleanly (SIGTERM), and keep
    its store: the SQLite database at DB_PATH (with `-wal`/`-shm` when there are any). Each later
    server of the same command starts on its own copy."""
    if not spec.uses_registry:
        return
    if isinstance(spec, NodeSpec):
        return await seed_node_registry(spec, ctx)
    store = Store.fresh(ctx.tmp, f"seed-{spec.kind}")
    meshes = ctx.scale.universe
    t0 = time.monotonic()
    server = spec.launch(ctx.tmp, store=store)
    await server.start()
    try:
        await register_meshes(server, ctx, meshes, workers=ctx.scale.workers)
    finally:
        codes = await server.stop()
    if any(code not in (0, -signal.SIGTERM) for code in codes):
        raise RuntimeError(f"seeding {spec.kind}: the server exited with {codes}, its store may be incomplete")
    if not (files := store.existing()):
        raise RuntimeError(f"seeding {spec.kind}: nothing written at DB_PATH {store.db}")
    if not store.db.exists():
        log.warning("seeding %s: no database at DB_PATH; an older gateway's registry file is copied instead", spec.kind)
    ctx.seeds[seed_key(spec)] = store
    log.info("seeded %s store with %d meshes in %.1fs (%s)", spec.kind, len(meshes), time.monotonic() - t0,
             ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in files))  # fmt: skip


def node_registry(meshes: list[str]) -> bytes:
    """The reference gateway's registry.json after registering `meshes` in that order, byte for byte:
    `JSON.stringify(registry, null, 2)` of `{meshId, secretHash, name}` with secretHash the hex sha256
    of the secret. Each mesh's fields are those of loadgen's `registration` (what the gateway is sent)."""
    entries = []
    for mesh in meshes:
        sent = json.loads(registration(mesh))
        entries.append({"meshId": sent["meshId"], "secretHash": hashlib.sha256(sent["secret"].encode()).hexdigest(),
                        "name": sent["name"]})  # fmt: skip
    return json.dumps(entries, indent=2, ensure_ascii=False).encode()


async def seed_node_registry(spec: NodeSpec, ctx: Context, *, check: int = 3) -> None:
    """The reference gateway's seed: its registry.json written directly with every mesh of the universe
    (10,000 registrations over HTTP would rewrite the whole file 10,000 times: ~O(n^2), minutes).
    Checked first against the gateway itself: a server on an empty registry is sent the first `check`
    registrations over HTTP, one by one, and the file it wrote must be exactly what the harness writes
    for them."""
    meshes = ctx.scale.universe
    t0 = time.monotonic()
    probe = spec.fresh_store(ctx.tmp, f"seedcheck-{spec.kind}")
    server = spec.launch(ctx.tmp, store=probe)
    await server.start()
    http = HttpClient(*server.endpoints[0])
    try:
        for mesh in meshes[:check]:
            async with asyncio.timeout(10):
                status, body = await http.request("POST", "/register", registration(mesh))
            if status != 200:
                raise RuntimeError(f"seeding {spec.kind}: /register {mesh} answered {status} {body[:100]!r}")
    finally:
        await http.aclose()
        codes = await server.stop()
    if any(code not in (0, -signal.SIGTERM) for code in codes):
        raise RuntimeError(f"seeding {spec.kind}: the server exited with {codes}")
    written, expected = probe.registry.read_bytes(), node_registry(meshes[:check])
    if written != expected:
        raise RuntimeError(f"seeding {spec.kind}: its registry.json after {check} registrations is not what the "
                           f"harness writes: {written[:200]!r} vs {expected[:200]!r}")  # fmt: skip
    store = spec.fresh_store(ctx.tmp, f"seed-{spec.kind}")
    store.registry.write_bytes(node_registry(meshes))
    ctx.seeds[seed_key(spec)] = store
    log.info("seeded %s registry.json with %d meshes in %.1fs (%s B; format checked against %d registrations "
             "by the server itself)", spec.kind, len(meshes), time.monotonic() - t0,
             f"{store.registry.stat().st_size:,}", check)  # fmt: skip


async def register_meshes(server: Server, ctx: Context, meshes: list[str], *, workers: int) -> None:
    """POST /register every mesh (to the server's first process), two keep-alive connections per worker."""
    async with Fleet(ctx.tmp, "register-setup") as fleet:
        await fleet.start([job("register", server, ctx, meshes=c, conns=2) for c in chunks(meshes, workers)])
        fleet.send("go")
        await fleet.expect("done", ctx.scale.timeout_s * 2)
        results = await fleet.results()
    if (ok := sum(r["ok"] for r in results)) != len(meshes):
        raise RuntimeError(f"{ok}/{len(meshes)} meshes registered; {results[0]['errors'][:3]}")


Scenario = Callable[..., Awaitable[Outcome]]  # (spec, ctx, **options)
SCENARIOS: dict[str, Scenario] = {
    "relay": relay,
    "fanout": fanout,
    "fanout-max": fanout_max,
    "conns": conns,
    "auth-storm": auth_storm,
    "register": register,
    # Limits against abuse (run.py's SIDES: each with its baseline)
    "storm-participants": storm_participants,
    "guess-flood": guess_flood,
    "preauth-memory": preauth_memory,
    "cluster": relay,  # run on the single-process gateway and on the cluster (run.py), compared with each other
    # Offline delivery (run.py's SIDES say what each is compared with):
    "relay-offline": relay,
    "fanout-max-offline": fanout_max,
    "fanout-away": fanout_away,
    "catchup": catchup,
    "kept-100k": kept_100k,
}
