"""Mesh Gateway benchmark: the gateway against the ceiling, scenario by scenario.

    python bench/run.py                     # full run: 3 alternating runs, fills results.json + README table
    python bench/run.py --quick --out /tmp/x.json   # seconds; what the test suite runs
    python bench/run.py --scenarios relay,fanout --runs 5
    python bench/run.py --servers ceiling --scenarios relay --ws wsproto --out /tmp/wsproto.json

Exit status: 0 when every scenario ran clean, 1 when any failed (lost messages,
unexpected closes, errors, a server that would not start).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
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
from servers import BENCH_DIR, PYTHON, ServerSpec, busy_seconds  # noqa: E402

log = logging.getLogger("bench")
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results.json"
README = BENCH_DIR / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
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
}


def server_specs(args: argparse.Namespace) -> dict[str, ServerSpec]:
    return {
        "gateway": ServerSpec("gateway", [PYTHON, str(args.gateway)], env=BENCH_ENV),
        "ceiling": ServerSpec(
            "ceiling", [PYTHON, str(BENCH_DIR / "ceiling.py"), "--ws", args.ws], port_flag=True, uses_registry=False
        ),
    }


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


async def run_one(name: str, spec: ServerSpec, ctx: Context, run: int) -> dict[str, Any]:
    if ctx.scale is not QUICK:
        await wait_for_quiet()
    t0 = time.monotonic()
    try:
        if spec.uses_registry and spec.kind not in ctx.seeds:
            await seed_registry(spec, ctx)
        outcome = await SCENARIOS[name](spec, ctx)
    except Exception as exc:  # one failed scenario must not stop the others
        log.exception("%s on %s failed", name, spec.kind)
        outcome = Outcome(errors=[f"{type(exc).__name__}: {exc}"])
    record = {
        "run": run, "scenario": name, "server": spec.kind, "ok": outcome.ok,
        "metrics": outcome.metrics, "server_cpu_pct": outcome.server_cpu_pct,
        "loadgen_cpu_pct": outcome.loadgen_cpu_pct, "other_cpu_pct": outcome.other_cpu_pct, "errors": outcome.errors[:20],
        "elapsed_s": time.monotonic() - t0,
        "noisy": outcome.other_cpu_pct > NOISY_PCT,  # someone else used the CPUs meanwhile: rerun if it matters
    }  # fmt: skip
    level = logging.INFO if outcome.ok else logging.ERROR
    log.log(level, "run %d %-10s %-8s %s cpu %% server %.0f loadgen %.0f other %.0f %s", run, name, spec.kind,
            {k: round(v, 3) for k, v in outcome.metrics.items()}, outcome.server_cpu_pct,
            outcome.loadgen_cpu_pct, outcome.other_cpu_pct, outcome.errors[:3])  # fmt: skip
    return record


def spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per scenario and metric: each server's median/min/max, and the gateway/ceiling ratio run by run."""
    summary: dict[str, Any] = {}
    for name in {r["scenario"] for r in records}:
        rows = [r for r in records if r["scenario"] == name and r["ok"]]
        by_run = {(r["server"], r["run"]): r for r in rows}
        metrics = sorted({m for r in rows for m in r["metrics"]})
        entry: dict[str, Any] = {}
        for metric in [*metrics, "server_cpu_pct", "loadgen_cpu_pct", "other_cpu_pct"]:
            def value(r: dict[str, Any]) -> float:
                return r[metric] if metric.endswith("cpu_pct") else r["metrics"].get(metric, float("nan"))

            entry[metric] = {kind: spread([value(r) for r in rows if r["server"] == kind]) for kind in ("gateway", "ceiling")}
            ratios = [
                value(by_run[("gateway", run)]) / value(by_run[("ceiling", run)])
                for (kind, run) in by_run
                if kind == "gateway" and ("ceiling", run) in by_run and value(by_run[("ceiling", run)])
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


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    ceiling = "ceiling" if report["ws"] == "websockets-sansio" else f"ceiling ({report['ws']})"
    lines = [
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['system']}, Python {m['python']}. "
        f"Date: {report['date']}. Commit: `{report['commit']}`. Runs: {report['runs']}, median (min–max).",
        "",
        f"| scenario | metric | gateway | {ceiling} | gateway/ceiling | server CPU % gw / ceil | loadgen CPU % gw / ceil |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, headlines in HEADLINES.items():
        entry = report["summary"].get(name)
        if entry is None:
            continue
        cpu, load = entry["server_cpu_pct"], entry["loadgen_cpu_pct"]
        for i, (metric, label, _) in enumerate(headlines):
            e = entry.get(metric, {})
            ratio = e.get("ratio")
            cells = [
                name if i == 0 else "",
                label,
                fmt(e.get("gateway")),
                fmt(e.get("ceiling")),
                f"{ratio['median']:.2f}" if ratio else "–",
                f"{fmt(cpu.get('gateway'))} / {fmt(cpu.get('ceiling'))}" if i == 0 else "",
                f"{fmt(load.get('gateway'))} / {fmt(load.get('ceiling'))}" if i == 0 else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme_table(text: str) -> None:
    content = README.read_text()
    head, _, rest = content.partition(BEGIN)
    _, _, tail = rest.partition(END)
    README.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "system": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "no commit"
    return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Mesh Gateway benchmark (gateway vs ceiling)")
    p.add_argument("--quick", action="store_true", help="tiny counts, one run, a few seconds (the test suite's smoke run)")
    p.add_argument("--runs", type=int, default=None, help="alternating runs per server (default 3, quick 1)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--servers", default="gateway,ceiling", help="comma list of gateway, ceiling")
    p.add_argument("--ws", default="websockets-sansio", choices=["websockets-sansio", "websockets", "wsproto"],
                   help="uvicorn WebSocket implementation of the ceiling")  # fmt: skip
    p.add_argument("--gateway", type=Path, default=REPO / "gateway.py", help="gateway script to start")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default bench/results.json, or a temp file with --quick)")  # fmt: skip
    p.add_argument("--readme", action=argparse.BooleanOptionalAction, default=None,
                   help="write the table into bench/README.md (default: only when writing bench/results.json)")  # fmt: skip
    args = p.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.servers = [s for s in args.servers.split(",") if s]
    if unknown := [s for s in args.scenarios if s not in SCENARIOS]:
        p.error(f"unknown scenarios: {unknown}")
    if unknown := [s for s in args.servers if s not in ("gateway", "ceiling")]:
        p.error(f"unknown servers: {unknown}")
    args.runs = args.runs or (1 if args.quick else 3)
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "mesh-bench-quick.json" if args.quick else RESULTS
    if args.readme is None:
        args.readme = args.out.resolve() == RESULTS
    return args


async def bench(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    specs = server_specs(args)
    ctx = Context(tmp=tmp, scale=QUICK if args.quick else FULL)
    records = []
    for run in range(args.runs):
        for name in args.scenarios:
            # Alternate which server goes first so slow drift (heat, page cache) hits both equally.
            kinds = args.servers if run % 2 == 0 else args.servers[::-1]
            for kind in kinds:
                records.append(await run_one(name, specs[kind], ctx, run))
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    raise_nofile()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    log.info("server and loadgen logs in %s", tmp)
    try:
        records = uvloop.run(bench(args, tmp))
    except BaseException:
        log.error("aborted; logs kept in %s", tmp)
        raise
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(), "machine": machine(), "runs": args.runs, "quick": args.quick, "ws": args.ws,
        "scenarios": args.scenarios, "servers": args.servers, "elapsed_s": round(time.monotonic() - started, 1),
        "summary": summarize(records), "records": records,
    }  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2) + "\n")
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
