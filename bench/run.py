"""Mesh Gateway benchmark: the gateway against the reference Node gateway and the ceiling, scenario by scenario.

    python bench/run.py                     # full run: 3 alternating runs, fills results.json + README table
    python bench/run.py --quick --out /tmp/x.json   # seconds; what the test suite runs (gateway, ceiling)
    python bench/run.py --servers gateway,ceiling,node --scenarios relay,fanout --runs 1 --no-readme --out /tmp/n.json
    python bench/run.py --scenarios relay,fanout --runs 5
    python bench/run.py --servers ceiling --scenarios relay --ws wsproto --out /tmp/wsproto.json
    python bench/run.py --scenarios cluster --runs 3 --no-readme --out /tmp/cluster.json   # 1 process vs 3 + Redis
    python bench/run.py --scenarios relay-offline,fanout-max-offline,fanout-away,catchup,kept-100k \
        --runs 1 --no-readme --out /tmp/offline.json          # offline delivery
    python bench/run.py --scenarios storm-participants,guess-flood,preauth-memory \
        --runs 1 --no-readme --out /tmp/abuse.json            # limits against abuse

Exit status: 0 when every scenario ran clean, 1 when any failed (lost messages,
unexpected closes, errors, a server that would not start).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runnable as a script and importable

import uvloop
from scenarios import FULL, QUICK, SCENARIOS, Context, Outcome, seed_key, seed_registry
from servers import BENCH_DIR, NODE_ARGV, PYTHON, ClusterSpec, NodeInstall, NodeSpec, ServerSpec, Spec, busy_seconds

log = logging.getLogger("bench")
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results.json"
README = BENCH_DIR / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SERVERS = ("gateway", "ceiling", "node")  # --servers; the other sides run only in the scenarios that compare them
DEFAULT_SERVERS, QUICK_SERVERS = "gateway,ceiling,node", "gateway,ceiling"  # quick: offline, no npm install
NODE_SOURCE = REPO.parent / "shared" / "reference-gateway"  # the reference Node gateway, read-only
NOISY_PCT = 25.0
# Rate limits lifted (one client machine sends everything), and the connection caps above what any
# scenario opens (10,000 meshes; 5,000 handshakes at once); everything else as in production.
# A gateway ignores the variables it does not know.
LIFTED = "100000000"
BENCH_ENV = {
    "RATE_LIMIT_PER_MIN": LIFTED, "UPDATE_RATE_PER_MIN": LIFTED, "REGISTER_PER_MIN": LIFTED,
    "AUTH_FAILURES_PER_MIN": LIFTED, "MAX_CONNECTIONS": "1000000", "MAX_PENDING_AUTH": "1000000",
}  # fmt: skip
# `guess-flood` measures the auth throttle and the pending-auth cap themselves: production values.
LIMITS_ENV = {**BENCH_ENV, "AUTH_FAILURES_PER_MIN": "10", "MAX_PENDING_AUTH": "1000", "MAX_CONNECTIONS": "20000"}


@dataclass(frozen=True)
class Side:
    """One side of a comparison: the label its records carry (`server` in the JSON), which server
    runs, and the scenario's options."""

    label: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)


GATEWAY, OFFLINE_OFF = Side("gateway", "gateway"), Side("offline-off", "offline-off")
# Scenarios compared with something other than the ceiling: (baseline, measured), run in that order
# (reversed every other run); the ratio is measured / baseline, run by run. They need `gateway` in --servers.
SIDES: dict[str, tuple[Side, ...]] = {
    "cluster": (GATEWAY, Side("cluster", "cluster")),
    "relay-offline": (OFFLINE_OFF, Side("gateway", "gateway", {"offline": True})),
    "fanout-max-offline": (OFFLINE_OFF, Side("gateway", "gateway", {"offline": True})),
    "fanout-away": (Side("gateway", "gateway", {"away_pct": 0.0}), Side("away", "gateway", {"away_pct": None})),
    "catchup": (GATEWAY,),  # no ceiling: it keeps nothing
    "kept-100k": (GATEWAY,),
    # Limits against abuse: each against the same load without what it adds, same run.
    "storm-participants": (Side("no-participants", "gateway", {"participants": False}),
                           Side("participants", "gateway", {"participants": True})),
    "guess-flood": (Side("quiet", "gateway-limits", {"flood": ""}), Side("flood", "gateway-limits", {"flood": "paced"}),
                    Side("flood-spread", "gateway-limits", {"flood": "spread"}),
                    Side("flood-max", "gateway-limits", {"flood": "max"})),
    "preauth-memory": (Side("quiet", "gateway", {"attack": False}), Side("attack", "gateway", {"attack": True})),
}  # fmt: skip

# Scenarios left out of --quick unless named (the quick run must stay ~25 s; see the README).
QUICK_SKIP: tuple[str, ...] = ("relay-offline", "fanout-max-offline", "kept-100k")
# Under --quick these run their last side only (the attacked one: its code is the baseline's and more).
QUICK_LAST_SIDE: tuple[str, ...] = ("storm-participants", "guess-flood", "preauth-memory")
# Table rows: scenario -> (metric, label, higher is better)
HEADLINES: dict[str, list[tuple[str, str, bool]]] = {
    "relay": [("msgs_per_s", "delivered msg/s", True), ("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False)],
    "fanout": [("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False), ("max_ms", "max ms", False)],
    "fanout-max": [("deliveries_per_s", "deliveries/s", True)],
    "conns": [("rss_kib_per_conn", "RSS KiB/conn", False)],
    "auth-storm": [("all_authed_s", "s until all authed", False), ("max_stall_ms", "worst stall ms", False)],
    "register": [("seconds", "s for all", False)],
    "cluster": [("msgs_per_s", "delivered msg/s", True), ("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False)],
}


def server_specs(args: argparse.Namespace, tmp: Path) -> dict[str, Spec]:
    gateway = args.gateway
    if gateway.is_file():  # a long run measures one version, even if gateway.py is edited meanwhile
        gateway = tmp / "snapshot" / gateway.name
        gateway.parent.mkdir()
        shutil.copy(args.gateway, gateway)
        cluster_mode = args.gateway.parent / "gateway_redis.py"  # imported by the snapshot with REDIS_URL
        if cluster_mode.is_file():
            shutil.copy(cluster_mode, gateway.parent / cluster_mode.name)
    single = ServerSpec("gateway", [PYTHON, str(gateway)], env=BENCH_ENV)
    return {
        "gateway": single,
        "offline-off": ServerSpec("offline-off", single.argv, env={**BENCH_ENV, "OFFLINE_TTL_S": "0"}),
        "gateway-limits": ServerSpec("gateway-limits", single.argv, env=LIMITS_ENV),
        "ceiling": ServerSpec(
            "ceiling", [PYTHON, str(BENCH_DIR / "ceiling.py"), "--ws", args.ws], port_flag=True, uses_registry=False
        ),
        "cluster": ClusterSpec("cluster", single, processes=3),
        "node": NodeSpec("node", NODE_ARGV, install=NodeInstall(args.node_source, tmp)),
    }


def sides_for(name: str, servers: list[str], scale: Any) -> list[Side]:
    """What a scenario runs on: its SIDES when it has any (with `gateway` in --servers), else each of --servers."""
    if name not in SIDES:
        return [Side(kind, kind) for kind in servers]
    if "gateway" not in servers:
        return []
    sides = SIDES[name][-1:] if scale is QUICK and name in QUICK_LAST_SIDE else SIDES[name]
    # `away_pct: None` is the scale's share (tiny meshes counts under --quick still leave one mesh away).
    return [
        dataclasses.replace(side, options={k: scale.away_pct if v is None and k == "away_pct" else v
                                           for k, v in side.options.items()})
        for side in sides
    ]  # fmt: skip


def node_install(specs: dict[str, Spec]) -> NodeInstall:
    spec = specs["node"]
    assert isinstance(spec, NodeSpec)
    return spec.install


def ratio_of(name: str) -> tuple[str, str]:
    """(numerator, denominator) labels of a scenario's ratio."""
    sides = SIDES.get(name)
    if sides is None:
        return "gateway", "ceiling"
    return (sides[-1].label, sides[0].label) if len(sides) > 1 else (sides[0].label, "")


def raise_nofile() -> None:
    """10k sockets need more than the usual 1024 descriptors; children inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.info("RLIMIT_NOFILE %d", hard)


async def wait_for_quiet(*, limit_pct: float = 15.0, max_wait_s: float = 60.0) -> float:
    """Wait (bounded) until the machine is idle before a measurement; returns the last busy %.

    Nothing of ours runs between scenarios, so what is busy now is someone else."""
    start = time.monotonic()
    while True:
        busy0, t0 = busy_seconds(), time.monotonic()
        await asyncio.sleep(0.5)
        busy = 100 * (busy_seconds() - busy0) / (time.monotonic() - t0)
        waited = time.monotonic() - start
        if busy <= limit_pct:
            if waited > 1:
                log.info("waited %.0fs for other processes to leave the CPUs", waited)
            return busy
        if waited > max_wait_s:
            log.warning("machine still busy (%.0f%% of a CPU) after %.0fs; measuring anyway", busy, waited)
            return busy


def source_sha(spec: Spec) -> str:
    """Which version of the server's script ran (the reference gateway: its server.ts before the sed)."""
    if isinstance(spec, NodeSpec):
        return str(spec.install.info.get("server_ts_sha256", "missing"))[:12]
    script = Path(spec.argv[1])
    return hashlib.sha256(script.read_bytes()).hexdigest()[:12] if script.is_file() else "missing"


async def run_one(name: str, side: Side, spec: Spec, ctx: Context, run: int) -> dict[str, Any]:
    if ctx.scale is not QUICK:
        await wait_for_quiet()
    t0 = time.monotonic()
    sha = source_sha(spec)
    try:
        if spec.uses_registry and seed_key(spec) not in ctx.seeds:
            await seed_registry(spec, ctx)
        outcome = await SCENARIOS[name](spec, ctx, **side.options)
    except Exception as exc:  # one failed scenario must not stop the others
        log.exception("%s on %s failed", name, side.label)
        outcome = Outcome(errors=[f"{type(exc).__name__}: {exc}"])
    record = {
        "run": run, "scenario": name, "server": side.label, "kind": spec.kind, "options": side.options,
        "source_sha": sha, "ok": outcome.ok,
        "metrics": outcome.metrics, "server_cpu_pct": outcome.server_cpu_pct,
        "loadgen_cpu_pct": outcome.loadgen_cpu_pct, "other_cpu_pct": outcome.other_cpu_pct,
        "errors": outcome.errors[:20],
        "elapsed_s": time.monotonic() - t0,
        "noisy": outcome.other_cpu_pct > NOISY_PCT,  # someone else used the CPUs meanwhile: rerun if it matters
    }  # fmt: skip
    level = logging.INFO if outcome.ok else logging.ERROR
    log.log(level, "run %d %-10s %-8s %s cpu %% server %.0f loadgen %.0f other %.0f %s", run, name, side.label,
            {k: round(v, 3) for k, v in outcome.metrics.items()}, outcome.server_cpu_pct,
            outcome.loadgen_cpu_pct, outcome.other_cpu_pct, outcome.errors[:3])  # fmt: skip
    return record


def rounded(obj: Any) -> Any:
    """Floats to 3 decimals, for a readable JSON file."""
    if isinstance(obj, float):
        return round(obj, 3)
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


def spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run_ratios(
    by_run: dict[tuple[str, int], dict[str, Any]], value: Any, top: str, bottom: str
) -> dict[str, float] | None:
    """`top`'s figure over `bottom`'s, run by run (the same run of both), as a spread."""
    return spread([
        value(by_run[(top, run)]) / value(by_run[(bottom, run)])
        for (kind, run) in by_run
        if kind == top and (bottom, run) in by_run and value(by_run[(bottom, run)])
    ])  # fmt: skip


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per scenario and metric: each server's median/min/max, and the ratio of the two servers
    compared (`ratio_of`: gateway/ceiling, or e.g. cluster/gateway) run by run; for the scenarios
    compared with the ceiling also gateway/node (`ratio_node`), run by run."""
    summary: dict[str, Any] = {}
    for name in {r["scenario"] for r in records}:
        top, bottom = ratio_of(name)
        ran = [r for r in records if r["scenario"] == name]
        rows = [r for r in ran if r["ok"]]
        by_run = {(r["server"], r["run"]): r for r in rows}
        metrics = sorted({m for r in rows for m in r["metrics"]})
        failed = [r["server"] for r in ran if not r["ok"]]
        labels = list(dict.fromkeys(r["server"] for r in ran))
        entry: dict[str, Any] = {
            "servers": {k: sum(r["server"] == k for r in ran) for k in labels},  # label -> runs
            "ratio": f"{top}/{bottom}" if bottom else None,
            "failed_runs": {k: failed.count(k) for k in labels},
        }
        if name not in SIDES:
            entry["ratio_node"] = "gateway/node"
        for metric in [*metrics, "server_cpu_pct", "loadgen_cpu_pct", "other_cpu_pct"]:

            def value(r: dict[str, Any], metric: str = metric) -> float:
                return r[metric] if metric.endswith("cpu_pct") else r["metrics"].get(metric, float("nan"))

            entry[metric] = {k: spread([value(r) for r in rows if r["server"] == k]) for k in labels}
            entry[metric]["ratio"] = run_ratios(by_run, value, top, bottom)
            if name not in SIDES:
                entry[metric]["ratio_node"] = run_ratios(by_run, value, "gateway", "node")
            if len(SIDES.get(name, ())) > 2:  # every side against the baseline (the first), run by run
                entry[metric]["ratios"] = {side.label: run_ratios(by_run, value, side.label, bottom)
                                           for side in SIDES[name][1:]}  # fmt: skip
        summary[name] = entry
    return summary


def fmt(s: dict[str, float] | None) -> str:
    if s is None:
        return "failed"

    def num(v: float) -> str:
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"

    return num(s["median"]) if s["n"] == 1 else f"{num(s['median'])} ({num(s['min'])}\u2013{num(s['max'])})"


def cell(entry: dict[str, Any], e: dict[str, Any], kind: str | None, *, note: bool = True) -> str:
    """One server's figure: "\u2013" when it did not run (or has no such figure), "failed" when every run failed."""
    if kind is None or kind not in entry["servers"]:
        return "\u2013"
    failed = entry["failed_runs"].get(kind, 0)
    if e.get(kind) is None:
        return "failed" if failed == entry["servers"][kind] else "\u2013"
    return fmt(e[kind]) + (f" **{failed} run(s) failed**" if failed and note else "")


def node_line(report: dict[str, Any]) -> str:
    """Which reference gateway ran (or why none did)."""
    node = report.get("node") or {}
    if reason := report.get("skipped_servers", {}).get("node"):
        return f"Node reference gateway: skipped ({reason})."
    if node.get("error"):
        return f"Node reference gateway: failed to install ({node['error']})."
    if "server_ts_sha256" not in node:
        return "Node reference gateway: not run (`--servers` without `node`)."
    return (
        f"Node reference gateway: server.ts sha256 `{node['server_ts_sha256'][:12]}` (unchanged but for its "
        f"README's rate-limit sed), node {node.get('node')}, ws {node.get('ws')}, tsx {node.get('tsx')}."
    )


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    versions = ", ".join(report["gateway_versions"]) or "\u2013"
    ceiling = "ceiling" if report["ws"] == "websockets-sansio" else f"ceiling ({report['ws']})"
    lines = [
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['system']}, Python {m['python']}. "
        f"Date: {report['date']}. Commit: `{report['commit']}` (gateway.py sha256 `{versions}`). "
        f"Runs: {report['runs']}, median (min\u2013max). {node_line(report)}",
    ]
    if any(name in report["summary"] for name in HEADLINES):
        lines += [
            "",
            f"| scenario | metric | gateway | node | {ceiling} | gateway/node | gateway/ceiling "
            "| server CPU % gw / node / ceil | loadgen CPU % gw / node / ceil |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for name, headlines in HEADLINES.items():
        entry = report["summary"].get(name)
        if entry is None:
            continue
        # The cluster's row holds the cluster, without node or ceiling; the comparison with one process follows.
        kinds = ("cluster", None, None) if name == "cluster" else ("gateway", "node", "ceiling")
        cpu, load = entry["server_cpu_pct"], entry["loadgen_cpu_pct"]
        for i, (metric, label, _) in enumerate(headlines):
            e = entry.get(metric, {})
            ratios = [e.get("ratio_node"), e.get("ratio")] if name != "cluster" else [None, None]
            first = i == 0
            cells = [
                (f"{name} (3 processes + Redis)" if name == "cluster" else name) if first else "",
                label,
                *(cell(entry, e, kind) for kind in kinds),
                *(f"{ratio['median']:.2f}" if ratio else "\u2013" for ratio in ratios),
                " / ".join(cell(entry, cpu, kind, note=False) for kind in kinds) if first else "",
                " / ".join(cell(entry, load, kind, note=False) for kind in kinds) if first else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if "cluster" in report["summary"]:
        lines += ["", cluster_table(report["summary"]["cluster"])]
    if any(name in report["summary"] for name in OFFLINE_HEADLINES):
        lines += ["", offline_table(report["summary"])]
    if any(name in report["summary"] for name in ABUSE_HEADLINES):
        lines += ["", abuse_table(report["summary"])]
    return "\n".join(lines)


# Offline delivery rows: scenario -> (title, [(metric, label, target)]); target: (">=" | "<", value) or None.
OFFLINE_HEADLINES: dict[str, tuple[str, list[tuple[str, str, tuple[str, float] | None]]]] = {
    "relay-offline": ("relay-offline (on / OFFLINE_TTL_S=0)", [
        ("msgs_per_s", "delivered msg/s", (">=", 0.95)), ("p50_ms", "p50 ms", None), ("p99_ms", "p99 ms", None)]),
    "fanout-max-offline": ("fanout-max-offline (on / OFFLINE_TTL_S=0)", [
        ("deliveries_per_s", "deliveries/s", (">=", 0.95))]),
    "fanout-away": ("fanout-away (10 % away / all connected)", [
        ("broadcasts_per_s", "broadcasts/s", (">=", 0.8)), ("deliveries_per_s", "deliveries/s", None),
        ("p50_ms", "p50 ms", None), ("p99_ms", "p99 ms", None), ("queued_after", "kept frames after", None)]),
    "catchup": ("catchup (10,000 frames, one mesh)", [
        ("catchup_frames_per_s", "catch-up frames/s", (">=", 20_000)),
        ("catchup_rss_growth_mb", "RSS growth MB (peak)", ("<", 10)),
        ("first_frame_ms", "auth_ok to 1st frame ms", None),
        ("kept_per_s", "kept (acked) frames/s", None),
        ("confirm_wait_ms", "last frame to its ping ms", None),
        ("resent_after_confirm", "sent again after confirmed", None)]),
    "kept-100k": ("kept-100k (~1 KB frames, 10 meshes)", [
        ("keep_s", "s to keep all", None), ("kept_per_s", "kept frames/s", None),
        ("rss_before_mb", "RSS before MB", None), ("rss_after_mb", "RSS after MB", None),
        ("rss_growth_mb", "RSS growth MB", None), ("rss_peak_growth_mb", "RSS peak growth MB", None),
        ("db_mb", "database MB", None),
        ("catchup_frames_per_s", "catch-up frames/s (all 10 at once)", None),
        ("catchup_rss_growth_mb", "catch-up RSS growth MB (peak)", None)]),
}  # fmt: skip


def offline_table(summary: dict[str, Any]) -> str:
    """The offline-delivery scenarios: each against its baseline from the same run, and the targets."""
    lines = [
        "Offline delivery: each scenario against its baseline in the same run (the ratio is measured/baseline "
        "per run, median); `catchup` and `kept-100k` have no baseline, their targets are absolute.",
        "",
        "| scenario | metric | measured | baseline | ratio | target | server CPU % | loadgen CPU % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (title, headlines) in OFFLINE_HEADLINES.items():
        entry = summary.get(name)
        if entry is None:
            continue
        top, bottom = ratio_of(name)
        cpu, load = entry["server_cpu_pct"], entry["loadgen_cpu_pct"]
        for i, (metric, label, target) in enumerate(headlines):
            e = entry.get(metric, {})
            ratio = e.get("ratio")
            judged = ratio if bottom else e.get(top)
            verdict = "\u2013"
            if target is not None:
                op, bound = target
                verdict = f"{'≥' if op == '>=' else '<'} {bound:,g}"
                if judged is not None:
                    met = judged["median"] >= bound if op == ">=" else judged["median"] < bound
                    verdict += ": met" if met else ": **missed**"
            cells = [
                title if i == 0 else "", label, cell(entry, e, top), cell(entry, e, bottom or None),
                f"{ratio['median']:.3g}" if ratio else "\u2013", verdict,
                f"{cell(entry, cpu, top, note=False)} / {cell(entry, cpu, bottom or None, note=False)}"
                if i == 0 else "",
                f"{cell(entry, load, top, note=False)} / {cell(entry, load, bottom or None, note=False)}"
                if i == 0 else "",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Limits against abuse: scenario -> (title, [(side, metric, label, target)]); each row is that side against
# the scenario's baseline (its first side) in the same run. target: (op, bound, "ratio" | "value") or None.
Target = tuple[str, float, str]
SYMBOLS = {"<=": "≤", "<": "<", ">=": "≥"}
ABUSE_HEADLINES: dict[str, tuple[str, list[tuple[str, str, str, Target | None]]]] = {
    "storm-participants": ("storm-participants (3 participants per mesh / none)", [
        ("participants", "all_authed_s", "s until the last gateway_auth_ok", ("<=", 2, "ratio")),
        ("participants", "settled_s", "s until every mesh has every other group", ("<=", 2, "ratio")),
        ("participants", "max_stall_ms", "worst stall of a connected mesh ms", None),
        ("participants", "group_mb", "participant frames received MB", None),
        ("participants", "groups_again", "groups received twice", None)]),
    "guess-flood": ("guess-flood (legit auth during wrong-secret floods / none)", [
        ("flood", "p50_ms", "paced flood: legit auth p50 ms", None),
        ("flood", "p99_ms", "paced flood: legit auth p99 ms", ("<=", 2, "ratio")),
        ("flood", "p99_upgrade_ms", "... p99 of its part until the 101", None),
        ("flood", "p99_after_upgrade_ms", "... p99 of its part from the 101 to gateway_auth_ok", None),
        ("flood", "p99_checking_ms", "... p99 while every guess is checked", None),
        ("flood", "p99_throttling_ms", "... p99 once guesses are throttled", None),
        ("flood", "attempts_per_s", "guesses/s", None),
        ("flood", "checked_per_s", "guesses checked/s", None),
        ("flood", "throttled_per_s", "guesses throttled/s", None),
        ("flood-spread", "p50_ms", "spread flood: legit auth p50 ms", None),
        ("flood-spread", "p99_ms", "spread flood: legit auth p99 ms", ("<=", 2, "ratio")),
        ("flood-spread", "p99_upgrade_ms", "... p99 of its part until the 101", None),
        ("flood-spread", "p99_after_upgrade_ms", "... p99 of its part from the 101 to gateway_auth_ok", None),
        ("flood-spread", "attempts_per_s", "guesses/s", None),
        ("flood-spread", "checked_per_s", "guesses checked/s", None),
        ("flood-spread", "throttled_per_s", "guesses throttled/s", None),
        ("flood-max", "p50_ms", "max flood: legit auth p50 ms", None),
        ("flood-max", "p99_ms", "max flood: legit auth p99 ms", ("<=", 2, "ratio")),
        ("flood-max", "p99_upgrade_ms", "... p99 of its part until the 101", None),
        ("flood-max", "p99_after_upgrade_ms", "... p99 of its part from the 101 to gateway_auth_ok", None),
        ("flood-max", "p99_throttling_ms", "... p99 once guesses are throttled", None),
        ("flood-max", "attempts_per_s", "guesses/s", None),
        ("flood-max", "checked_per_s", "guesses checked/s", None),
        ("flood-max", "throttled_per_s", "guesses throttled/s", None)]),
    "preauth-memory": ("preauth-memory (unauthenticated sockets that try to make it buffer / none)", [
        ("attack", "rss_peak_mb", "gateway peak RSS MB", ("<", 200, "value")),
        ("attack", "rss_growth_mb", "RSS growth MB (peak)", None),
        ("attack", "connect_first_ms", "legit connect + auth ms, beside the silent sockets", None),
        ("attack", "connect_second_ms", "... a second one as they send", None),
        ("attack", "relay_p99_ms", "legit relay p99 ms", None),
        ("attack", "relay_max_ms", "legit relay max ms", None),
        ("attack", "frames_1009", "1 MiB frames closed 1009", None),
        ("attack", "fragments_1009", "fragmented messages closed 1009", None),
        ("attack", "headers_431", "endless headers answered 431", None),
        ("attack", "headers_reset", "... reset before their 431 arrived", None),
        ("attack", "header_sent_max_kib", "header KiB written before the answer (most)", None)]),
}  # fmt: skip


def abuse_table(summary: dict[str, Any]) -> str:
    """The abuse-limit scenarios: each attacked (or heavier) side against the same load without it, same run."""
    lines = [
        (
            "Limits against abuse: each measured side against its baseline in the same run (the ratio is "
            "measured/baseline per run, median)."
        ),
        "",
        "| scenario | metric | measured | baseline | ratio | target | server CPU % | loadgen CPU % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (title, headlines) in ABUSE_HEADLINES.items():
        entry = summary.get(name)
        if entry is None:
            continue
        base = SIDES[name][0].label
        shown: set[str] = set()
        for i, (side, metric, label, target) in enumerate(headlines):
            e = entry.get(metric, {})
            ratio = (e.get("ratios") or {}).get(side) if "ratios" in e else e.get("ratio")
            verdict = "\u2013"
            if target is not None:
                op, bound, on = target
                verdict = f"{SYMBOLS[op]} {bound:,g}" + ("\u00d7" if on == "ratio" else "")
                judged = ratio if on == "ratio" else e.get(side)
                if judged is not None:
                    v = judged["median"]
                    met = {"<=": v <= bound, "<": v < bound, ">=": v >= bound}[op]
                    verdict += ": met" if met else ": **missed**"
            first = side not in shown
            shown.add(side)
            cpu, load = entry["server_cpu_pct"], entry["loadgen_cpu_pct"]
            cells = [
                title if i == 0 else "", label, cell(entry, e, side),
                cell(entry, e, base) if e.get(base) is not None else "\u2013",
                f"{ratio['median']:.3g}" if ratio else "\u2013", verdict,
                f"{cell(entry, cpu, side, note=False)} / {cell(entry, cpu, base, note=False)}" if first else "",
                f"{cell(entry, load, side, note=False)} / {cell(entry, load, base, note=False)}" if first else "",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cluster_table(entry: dict[str, Any]) -> str:
    """The cluster scenario side by side: the same relay workload on one process and on the cluster."""
    rows = [(metric, label) for metric, label, _ in HEADLINES["cluster"]]
    rows += [("server_cpu_pct", "server CPU % (cluster: all 4 processes)"), ("loadgen_cpu_pct", "loadgen CPU %")]
    rows += [(m, f"CPU % {m.removeprefix('cpu_pct_')}") for m in sorted(entry) if m.startswith("cpu_pct_")]
    lines = [
        "Cluster: the `relay` workload on one gateway process and on three gateway processes sharing one "
        "redis-server (each pair's sender and receiver on different processes), alternating in the same run.",
        "",
        "| metric | single process | cluster | cluster/single |",
        "|---|---|---|---|",
    ]
    for metric, label in rows:
        e = entry.get(metric, {})
        ratio = fmt(e["ratio"]) if e.get("ratio") else "\u2013"
        lines.append(f"| {label} | {cell(entry, e, 'gateway')} | {cell(entry, e, 'cluster')} | {ratio} |")
    return "\n".join(lines)


def write_readme_table(text: str) -> None:
    content = README.read_text()
    head, _, rest = content.partition(BEGIN)
    _, _, tail = rest.partition(END)
    README.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    system = f"{platform.system()} {platform.release()}"
    return {"cpu": cpu, "cpus": os.cpu_count(), "system": system, "python": platform.python_version()}


def commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "no commit"
    return sha + (" + uncommitted gateway.py" if git("status", "--porcelain", "--", "gateway.py") else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Mesh Gateway benchmark (gateway vs the Node reference gateway and the ceiling)"
    )
    p.add_argument("--quick", action="store_true", help="tiny counts, one run, seconds (the test suite's smoke run)")
    p.add_argument("--runs", type=int, default=None, help="alternating runs per server (default 3, quick 1)")
    p.add_argument("--scenarios", default=None,
                   help=f"comma list of {', '.join(SCENARIOS)} "
                        f"(default all; --quick: all but {', '.join(QUICK_SKIP)})")  # fmt: skip
    p.add_argument("--servers", default=None,
                   help=f"comma list of {', '.join(SERVERS)} (default {DEFAULT_SERVERS}, node skipped without npm; "
                        f"--quick: {QUICK_SERVERS}); `cluster` always runs gateway and the cluster")  # fmt: skip
    p.add_argument("--node-source", type=Path, default=NODE_SOURCE,
                   help="the reference Node gateway's source (server.ts, package.json, package-lock.json), "
                        "copied and installed in the run's temp dir")  # fmt: skip
    p.add_argument("--ws", default="websockets-sansio", choices=["websockets-sansio", "websockets", "wsproto"],
                   help="uvicorn WebSocket implementation of the ceiling")  # fmt: skip
    p.add_argument("--gateway", type=Path, default=REPO / "gateway.py", help="gateway script to start")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default bench/results.json, or a temp file with --quick)")  # fmt: skip
    p.add_argument("--probes", type=int, default=None,
                   help=f"guess-flood: legit authentications per side (default {FULL.probes}; more makes "
                        "its p99 less noisy); at least 100, not with --quick")  # fmt: skip
    p.add_argument("--flood-rate", type=float, default=None,
                   help=f"guess-flood: the paced floods' guesses a second (default {FULL.flood_rate:.0f}); "
                        "not with --quick")  # fmt: skip
    p.add_argument("--readme", action=argparse.BooleanOptionalAction, default=None,
                   help="write the table into bench/README.md (default: when writing bench/results.json)")  # fmt: skip
    args = p.parse_args(argv)
    if args.probes is not None and (args.quick or args.probes < 100):
        p.error("--probes takes at least 100, and not with --quick")
    if args.flood_rate is not None and (args.quick or not 0 < args.flood_rate <= 5000):
        p.error("--flood-rate takes a rate above 0 and at most 5000, and not with --quick")
    if args.scenarios is None:
        args.scenarios = ",".join(name for name in SCENARIOS if not (args.quick and name in QUICK_SKIP))
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if args.servers is None:
        args.servers = QUICK_SERVERS if args.quick else DEFAULT_SERVERS
    args.servers = [s for s in args.servers.split(",") if s]
    if unknown := [s for s in args.scenarios if s not in SCENARIOS]:
        p.error(f"unknown scenarios: {unknown}")
    if unknown := [s for s in args.servers if s not in SERVERS]:
        p.error(f"unknown servers: {unknown}")
    args.runs = args.runs or (1 if args.quick else 3)
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "mesh-bench-quick.json" if args.quick else RESULTS
    if args.readme is None:
        args.readme = args.out.resolve() == RESULTS
    return args


async def bench(args: argparse.Namespace, tmp: Path, specs: dict[str, Spec]) -> list[dict[str, Any]]:
    overrides = {"probes": args.probes, "flood_rate": args.flood_rate}
    scale = dataclasses.replace(FULL, **{name: value for name, value in overrides.items() if value is not None})
    ctx = Context(tmp=tmp, scale=QUICK if args.quick else scale)
    if "node" in args.servers:  # once per harness run, before the first scenario
        install = node_install(specs)
        await install.prepare()
        if install.skipped:
            log.warning("node server skipped: %s", install.skipped)
            args.servers = [s for s in args.servers if s != "node"]
    if skipped := [name for name in args.scenarios if name in SIDES and "gateway" not in args.servers]:
        log.warning("%s skipped: they run on the gateway, which --servers leaves out", ", ".join(skipped))
    records = []
    for run in range(args.runs):
        for name in args.scenarios:
            # Alternate which server goes first so slow drift (heat, page cache) hits both equally.
            sides = sides_for(name, args.servers, ctx.scale)
            for side in sides if run % 2 == 0 else sides[::-1]:
                records.append(await run_one(name, side, specs[side.kind], ctx, run))
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    raise_nofile()
    started, start_commit = time.monotonic(), commit()
    tmp = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    log.info("server and loadgen logs in %s", tmp)
    asked = list(args.servers)
    try:
        specs = server_specs(args, tmp)
        records = uvloop.run(bench(args, tmp, specs))
    except BaseException:
        log.error("aborted; logs kept in %s", tmp)
        raise
    install = node_install(specs)
    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": start_commit, "machine": machine(),
        "gateway_versions": sorted({r["source_sha"] for r in records if r["kind"] not in ("ceiling", "node")}),
        "runs": args.runs, "quick": args.quick, "ws": args.ws,
        "scenarios": args.scenarios, "servers": args.servers, "servers_asked": asked,
        "skipped_servers": {"node": install.skipped} if install.skipped else {},
        "node": {**install.info, **({"error": install.error} if install.error else {})} if "node" in asked else None,
        "elapsed_s": round(time.monotonic() - started, 1),
        "summary": summarize(records), "records": records,
    }  # fmt: skip
    args.out.write_text(json.dumps(rounded(report), indent=2) + "\n")
    text = table(report)
    print(text)
    if args.readme:
        write_readme_table(text)
    failed = [f"{r['scenario']}/{r['server']}/run {r['run']}" for r in records if not r["ok"]]
    if failed:
        log.error("failed: %s; logs kept in %s", ", ".join(failed), tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("results in %s (%.0fs)", args.out, time.monotonic() - started)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
