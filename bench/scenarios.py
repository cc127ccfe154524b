"""The benchmark scenarios. Each is `async def name(spec, ctx) -> Outcome`:
it launches a fresh server from `spec`, drives it with loadgen workers, and
measures. `cluster` is the relay workload again: on a single process it is
`relay`; on a cluster (several gateways, one redis-server) each pair's two
meshes connect to different processes, so every message crosses Redis."""

from __future__ import annotations

import asyncio
import logging
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servers import Cluster, Fleet, Server, Spec, busy_seconds

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

    @property
    def universe(self) -> list[str]:
        """Every mesh id a scenario may use; the gateway gets them registered once."""
        n = max(self.conns, self.storm + 1, self.fanout_meshes, 2 * self.relay_pairs)
        return [mesh_id(i) for i in range(n)]


FULL = Scale()
QUICK = Scale(
    relay_pairs=2, relay_window=8, warmup_s=0.2, measure_s=0.5, fanout_meshes=6, fanout_rate=50.0,
    fanout_window=4, conns=40, storm=30, register=40, workers=2, settle_s=0.2, timeout_s=30.0, check_rate=False,
)  # fmt: skip


def mesh_id(i: int) -> str:
    return f"m-{i:05d}"


@dataclass
class Context:
    tmp: Path
    scale: Scale
    seeds: dict[str, Path] = field(default_factory=dict)  # server kind -> prepared registry

    def registry(self, spec: Spec, *, empty: bool = False) -> Path | None:
        """A private copy of the prepared registry and its journal (or a new empty one) for one server run."""
        if not spec.uses_registry:
            return None
        path = self.tmp / f"registry-{time.monotonic_ns()}.json"
        if not empty and spec.kind in self.seeds:
            seed = self.seeds[spec.kind]
            for source, target in ((seed, path), (journal(seed), journal(path))):
                if source.exists():
                    shutil.copy(source, target)
        return path


def journal(registry: Path) -> Path:
    """The gateway keeps `<REGISTRY_PATH>` plus the changes since in `<REGISTRY_PATH>.journal`."""
    return registry.with_name(registry.name + ".journal")


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


async def relay(spec: Spec, ctx: Context) -> Outcome:
    """Sender/receiver pairs. With several processes (a cluster), pair i's sender connects to
    process i and its receiver to process i+1 (mod n): every relay crosses the backplane."""
    s = ctx.scale
    pairs = [(mesh_id(2 * i), mesh_id(2 * i + 1)) for i in range(s.relay_pairs)]
    async with spec.launch(ctx.tmp, registry=ctx.registry(spec)) as server, Fleet(ctx.tmp, "relay") as fleet:
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
        results, meter = await measured_window(server, fleet, ctx)
    window = statistics.mean(r["window_s"] for r in results)
    lat = latency(results)
    rate = sum(r["count"] for r in results) / window
    metrics = {"msgs_per_s": rate, "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"]}
    metrics.update({f"cpu_pct_{name}": pct for name, pct in meter.parts_pct.items()})  # cluster: per process
    out = outcome(metrics, meter, results)
    if spread and spread != {port: list(placed.values()).count(port) for port in ports}:
        out.errors.append(f"meshes per process (port: /health connected) {spread}, not as placed")
    return out


async def _fanout(spec: Spec, ctx: Context, *, rate: float) -> tuple[Outcome, list[dict[str, Any]]]:
    s = ctx.scale
    meshes = [mesh_id(i) for i in range(s.fanout_meshes)]
    async with spec.launch(ctx.tmp, registry=ctx.registry(spec)) as server, Fleet(ctx.tmp, "fanout") as fleet:
        params = {"sender": meshes[0], "receivers": meshes[1:], "rate": rate, "window": s.fanout_window}
        await fleet.start([job("fanout", server, ctx, **params)])
        results, meter = await measured_window(server, fleet, ctx)
    return outcome({"deliveries_per_s": results[0]["count"] / results[0]["window_s"]}, meter, results), results


async def fanout(spec: Spec, ctx: Context) -> Outcome:
    out, results = await _fanout(spec, ctx, rate=ctx.scale.fanout_rate)
    out.metrics.update(latency(results))
    expected = ctx.scale.fanout_rate * (ctx.scale.fanout_meshes - 1)
    if ctx.scale.check_rate and out.metrics["deliveries_per_s"] < 0.95 * expected:
        out.errors.append(f"delivered {out.metrics['deliveries_per_s']:.0f}/s, below the offered {expected:.0f}/s")
    return out


async def fanout_max(spec: Spec, ctx: Context) -> Outcome:
    return (await _fanout(spec, ctx, rate=0.0))[0]


def elapsed(results: list[dict[str, Any]]) -> float:
    """From the first worker's `go` to the last worker's `done`."""
    return max(r.get("done_t", float("nan")) for r in results) - min(r["mark_t"] for r in results)


async def conns(spec: Spec, ctx: Context) -> Outcome:
    """Idle authenticated meshes whose clients offer permessage-deflate, as Node's `ws` does."""
    s = ctx.scale
    meshes = [mesh_id(i) for i in range(s.conns)]
    async with spec.launch(ctx.tmp, registry=ctx.registry(spec)) as server, Fleet(ctx.tmp, "conns") as fleet:
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
    s = ctx.scale
    meshes = [mesh_id(i) for i in range(s.storm)]
    async with (
        spec.launch(ctx.tmp, registry=ctx.registry(spec)) as server,
        Fleet(ctx.tmp, "watcher") as watcher,
        Fleet(ctx.tmp, "storm") as storm,
    ):
        await watcher.start([job("watcher", server, ctx, mesh=mesh_id(s.storm))])
        # The storm runs niced so that the watcher's own process is not what stalls.
        params = {"nice": 5, "connect_timeout_s": s.timeout_s, "retries": 2}
        await storm.start([job("connect", server, ctx, meshes=c, **params) for c in chunks(meshes, s.workers)])
        watcher.send("go")
        await asyncio.sleep(0.2)  # a baseline of quiet round trips
        storm.send("go")
        meter = Meter(server)
        late = await until_done(storm, s.timeout_s)
        meter.stop()
        storm_results = await storm.results()
        watch = (await watcher.results())[0]
    metrics = {
        "all_authed_s": elapsed(storm_results),
        "max_stall_ms": max(watch["samples"], default=0) / 1e6,
        "watcher_pings": watch["count"],
        "reconnects": sum(r["reconnects"] for r in storm_results),  # connects refused/reset, retried after 0.5 s
    }
    out = outcome(metrics, meter, storm_results)
    out.errors[:0] = late
    check([watch], out)
    return out


async def register(spec: Spec, ctx: Context) -> Outcome:
    """Registrations into an empty registry from `register_clients` concurrent keep-alive connections."""
    s = ctx.scale
    meshes = [f"r-{i:05d}" for i in range(s.register)]
    registry = ctx.registry(spec, empty=True)
    async with spec.launch(ctx.tmp, registry=registry) as server, Fleet(ctx.tmp, "register") as fleet:
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


async def seed_registry(spec: Spec, ctx: Context) -> None:
    """Register every mesh of the universe once and keep the server's persisted registry file."""
    if not spec.uses_registry:
        return
    path = ctx.tmp / f"seed-{spec.kind}.json"
    meshes = ctx.scale.universe
    t0 = time.monotonic()
    async with spec.launch(ctx.tmp, registry=path) as server:
        await register_meshes(server, ctx, meshes, workers=ctx.scale.workers)
    if not (path.exists() or journal(path).exists()):
        raise RuntimeError(f"seeding {spec.kind}: no registry file written")
    ctx.seeds[spec.kind] = path
    log.info("seeded %s registry with %d meshes in %.1fs", spec.kind, len(meshes), time.monotonic() - t0)


async def register_meshes(server: Server, ctx: Context, meshes: list[str], *, workers: int) -> None:
    """POST /register every mesh (to the server's first process), two keep-alive connections per worker."""
    async with Fleet(ctx.tmp, "register-setup") as fleet:
        await fleet.start([job("register", server, ctx, meshes=c, conns=2) for c in chunks(meshes, workers)])
        fleet.send("go")
        await fleet.expect("done", ctx.scale.timeout_s * 2)
        results = await fleet.results()
    if (ok := sum(r["ok"] for r in results)) != len(meshes):
        raise RuntimeError(f"{ok}/{len(meshes)} meshes registered; {results[0]['errors'][:3]}")


Scenario = Callable[[Spec, Context], Awaitable[Outcome]]
SCENARIOS: dict[str, Scenario] = {
    "relay": relay,
    "fanout": fanout,
    "fanout-max": fanout_max,
    "conns": conns,
    "auth-storm": auth_storm,
    "register": register,
    "cluster": relay,  # run on the single-process gateway and on the cluster (run.py), compared with each other
}
