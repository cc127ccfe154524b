"""Mesh Gateway benchmark: the gateway against the ceiling, scenario by scenario.

    python bench/run.py                     # full run: 3 alternating runs, fills results.json + README table
    python bench/run.py --quick --out /tmp/x.json   # seconds; what the test suite runs
    python bench/run.py --scenarios relay,fanout --runs 5
    python bench/run.py --servers ceiling --scenarios relay --ws wsproto --out /tmp/wsproto.json
    python bench/run.py --scenarios cluster --runs 3 --no-readme --out /tmp/cluster.json   # 1 process vs 3 + Redis

Exit status: 0 when every scenario ran clean, 1 when any failed (lost messages,
unexpected closes, errors, a server that would not start).
"""

from __future__ import annotations

import argparse
import asyncio
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runnable as a script and importable

import uvloop  # noqa: E402

from scenarios import FULL, QUICK, SCENARIOS, Context, Outcome, seed_registry  # noqa: E402
from servers import BENCH_DIR, PYTHON, ClusterSpec, ServerSpec, Spec, busy_seconds  # noqa: E402

log = logging.getLogger("bench")
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results.json"
README = BENCH_DIR / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
KINDS = ("gateway", "ceiling", "cluster")
SERVERS = ("gateway", "ceiling")  # --servers; `cluster` runs in the cluster scenario only
# Which server is compared with which: numerator, denominator (default: gateway / ceiling).
RATIOS: dict[str, tuple[str, str]] = {"cluster": ("cluster", "gateway")}
NOISY_PCT = 25.0
BENCH_ENV = {"RATE_LIMIT_PER_MIN": "100000000"}  # everything else as in production

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
    single = ServerSpec("gateway", [PYTHON, str(gateway)], env=BENCH_ENV)
    return {
        "gateway": single,
        "ceiling": ServerSpec(
            "ceiling", [PYTHON, str(BENCH_DIR / "ceiling.py"), "--ws", args.ws], port_flag=True, uses_registry=False
        ),
        "cluster": ClusterSpec("cluster", single, processes=3),
    }


def servers_for(name: str, servers: list[str]) -> list[str]:
    """`cluster` compares the cluster with the single-process gateway in the same run; the rest use --servers."""
    if name == "cluster":
        return ["gateway", "cluster"] if "gateway" in servers else []
    return servers


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
    """Which version of the server's script ran."""
    script = Path(spec.argv[1])
    return hashlib.sha256(script.read_bytes()).hexdigest()[:12] if script.is_file() else "missing"


async def run_one(name: str, spec: Spec, ctx: Context, run: int) -> dict[str, Any]:
    if ctx.scale is not QUICK:
        await wait_for_quiet()
    t0 = time.monotonic()
    sha = source_sha(spec)
    try:
        if spec.uses_registry and spec.kind not in ctx.seeds:
            await seed_registry(spec, ctx)
        outcome = await SCENARIOS[name](spec, ctx)
    except Exception as exc:  # one failed scenario must not stop the others
        log.exception("%s on %s failed", name, spec.kind)
        outcome = Outcome(errors=[f"{type(exc).__name__}: {exc}"])
    record = {
        "run": run, "scenario": name, "server": spec.kind, "source_sha": sha, "ok": outcome.ok,
        "metrics": outcome.metrics, "server_cpu_pct": outcome.server_cpu_pct,
        "loadgen_cpu_pct": outcome.loadgen_cpu_pct, "other_cpu_pct": outcome.other_cpu_pct,
        "errors": outcome.errors[:20],
        "elapsed_s": time.monotonic() - t0,
        "noisy": outcome.other_cpu_pct > NOISY_PCT,  # someone else used the CPUs meanwhile: rerun if it matters
    }  # fmt: skip
    level = logging.INFO if outcome.ok else logging.ERROR
    log.log(level, "run %d %-10s %-8s %s cpu %% server %.0f loadgen %.0f other %.0f %s", run, name, spec.kind,
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


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per scenario and metric: each server's median/min/max, and the ratio of the two servers
    compared (`RATIOS`: gateway/ceiling, or cluster/gateway) run by run."""
    summary: dict[str, Any] = {}
    for name in {r["scenario"] for r in records}:
        top, bottom = RATIOS.get(name, ("gateway", "ceiling"))
        ran = [r for r in records if r["scenario"] == name]
        rows = [r for r in ran if r["ok"]]
        by_run = {(r["server"], r["run"]): r for r in rows}
        metrics = sorted({m for r in rows for m in r["metrics"]})
        failed = [r["server"] for r in ran if not r["ok"]]
        entry: dict[str, Any] = {
            "servers": {k: n for k in KINDS if (n := sum(r["server"] == k for r in ran))},  # kind -> runs
            "ratio": f"{top}/{bottom}",
            "failed_runs": {k: failed.count(k) for k in KINDS},
        }
        for metric in [*metrics, "server_cpu_pct", "loadgen_cpu_pct", "other_cpu_pct"]:
            def value(r: dict[str, Any]) -> float:
                return r[metric] if metric.endswith("cpu_pct") else r["metrics"].get(metric, float("nan"))

            entry[metric] = {k: spread([value(r) for r in rows if r["server"] == k]) for k in KINDS}
            ratios = [
                value(by_run[(top, run)]) / value(by_run[(bottom, run)])
                for (kind, run) in by_run
                if kind == top and (bottom, run) in by_run and value(by_run[(bottom, run)])
            ]
            entry[metric]["ratio"] = spread(ratios)
        summary[name] = entry
    return summary


def fmt(s: dict[str, float] | None) -> str:
    if s is None:
        return "failed"
    def num(v: float) -> str:
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return num(s["median"]) if s["n"] == 1 else f"{num(s['median'])} ({num(s['min'])}–{num(s['max'])})"


def cell(entry: dict[str, Any], e: dict[str, Any], kind: str | None, *, note: bool = True) -> str:
    """One server's figure: "–" when it did not run (or has no such figure), "failed" when every run failed."""
    if kind is None or kind not in entry["servers"]:
        return "–"
    failed = entry["failed_runs"][kind]
    if e.get(kind) is None:
        return "failed" if failed == entry["servers"][kind] else "–"
    return fmt(e[kind]) + (f" **{failed} run(s) failed**" if failed and note else "")


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    versions = ", ".join(report["gateway_versions"]) or "–"
    ceiling = "ceiling" if report["ws"] == "websockets-sansio" else f"ceiling ({report['ws']})"
    lines = [
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['system']}, Python {m['python']}. "
        f"Date: {report['date']}. Commit: `{report['commit']}` (gateway.py sha256 `{versions}`). "
        f"Runs: {report['runs']}, median (min–max).",
        "",
        f"| scenario | metric | gateway | {ceiling} | gateway/ceiling "
        "| server CPU % gw / ceil | loadgen CPU % gw / ceil |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, headlines in HEADLINES.items():
        entry = report["summary"].get(name)
        if entry is None:
            continue
        # The cluster's row holds the cluster, without a ceiling; the comparison with one process follows below.
        left, right = ("cluster", None) if name == "cluster" else ("gateway", "ceiling")
        cpu, load = entry["server_cpu_pct"], entry["loadgen_cpu_pct"]
        for i, (metric, label, _) in enumerate(headlines):
            e = entry.get(metric, {})
            ratio = e.get("ratio") if right else None
            first = i == 0
            cells = [
                (f"{name} (3 processes + Redis)" if name == "cluster" else name) if first else "",
                label,
                cell(entry, e, left),
                cell(entry, e, right),
                f"{ratio['median']:.2f}" if ratio else "–",
                f"{cell(entry, cpu, left, note=False)} / {cell(entry, cpu, right, note=False)}" if first else "",
                f"{cell(entry, load, left, note=False)} / {cell(entry, load, right, note=False)}" if first else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if "cluster" in report["summary"]:
        lines += ["", cluster_table(report["summary"]["cluster"])]
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
        ratio = fmt(e["ratio"]) if e.get("ratio") else "–"
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
    p = argparse.ArgumentParser(description="Mesh Gateway benchmark (gateway vs ceiling)")
    p.add_argument("--quick", action="store_true", help="tiny counts, one run, seconds (the test suite's smoke run)")
    p.add_argument("--runs", type=int, default=None, help="alternating runs per server (default 3, quick 1)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--servers", default="gateway,ceiling",
                   help="comma list of gateway, ceiling (`cluster` always runs gateway and the cluster)")  # fmt: skip
    p.add_argument("--ws", default="websockets-sansio", choices=["websockets-sansio", "websockets", "wsproto"],
                   help="uvicorn WebSocket implementation of the ceiling")  # fmt: skip
    p.add_argument("--gateway", type=Path, default=REPO / "gateway.py", help="gateway script to start")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default bench/results.json, or a temp file with --quick)")  # fmt: skip
    p.add_argument("--readme", action=argparse.BooleanOptionalAction, default=None,
                   help="write the table into bench/README.md (default: when writing bench/results.json)")  # fmt: skip
    args = p.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
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


async def bench(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    specs = server_specs(args, tmp)
    ctx = Context(tmp=tmp, scale=QUICK if args.quick else FULL)
    if "cluster" in args.scenarios and "gateway" not in args.servers:
        log.warning("cluster skipped: it compares the cluster with the gateway, which --servers leaves out")
    records = []
    for run in range(args.runs):
        for name in args.scenarios:
            # Alternate which server goes first so slow drift (heat, page cache) hits both equally.
            servers = servers_for(name, args.servers)
            kinds = servers if run % 2 == 0 else servers[::-1]
            for kind in kinds:
                records.append(await run_one(name, specs[kind], ctx, run))
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    raise_nofile()
    started, start_commit = time.monotonic(), commit()
    tmp = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    log.info("server and loadgen logs in %s", tmp)
    try:
        records = uvloop.run(bench(args, tmp))
    except BaseException:
        log.error("aborted; logs kept in %s", tmp)
        raise
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": start_commit, "machine": machine(),
        "gateway_versions": sorted({r["source_sha"] for r in records if r["server"] in ("gateway", "cluster")}),
        "runs": args.runs, "quick": args.quick, "ws": args.ws,
        "scenarios": args.scenarios, "servers": args.servers, "elapsed_s": round(time.monotonic() - started, 1),
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
