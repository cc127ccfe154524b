"""Child processes: the server under test and the load generator workers.

The server is pinned to CPU 0 and the workers to CPU 1 (with `taskset`, when
it exists and the machine has two CPUs); a cluster's gateways and its
redis-server all share CPU 0. Every child is stopped by its PID in a
`finally`, whatever happened.

The `node` server is the reference Node.js gateway (`NodeInstall`: a scratch
copy of its source, `npm ci`-ed once per harness run, rate limit lifted by its
README's `sed`), each run from its own copy of `server.ts` beside its own
`registry.json` (`NodeStore`).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsclient import HttpClient

log = logging.getLogger("bench")
BENCH_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable
HOST = "127.0.0.1"
SERVER_CPU, LOAD_CPU = 0, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the harness itself dies (even by SIGKILL)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def pinned(cpu: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu)]
    return []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc (children not included); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def with_descendants(pid: int) -> list[int]:
    """`pid` and every live process below it (e.g. the gateway's hashing worker processes)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(child) for child in children.read_text().split()]
            except OSError:
                continue
    return found


def busy_seconds() -> float:
    """CPU time spent by everything on the machine (all CPUs, idle and iowait excluded)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def stop_pid(proc: asyncio.subprocess.Process, *, grace: float = 12.0) -> int | None:
    """SIGTERM, then SIGKILL after `grace` seconds. Only ever this one PID."""
    if proc.returncode is None:
        try:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), grace)
        except (TimeoutError, ProcessLookupError):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return proc.returncode


# --- Stores --------------------------------------------------------------------


def sidecar(path: Path, suffix: str) -> Path:
    """`gateway.db` -> `gateway.db-wal` (SQLite's own naming), `registry.json` -> `registry.json.journal`."""
    return path.with_name(path.name + suffix)


@dataclass(frozen=True)
class Store:
    """Where one gateway process keeps its state: its own `DB_PATH` SQLite database
    (registry and offline mailboxes), with SQLite's `-wal` / `-shm` files beside it.

    `REGISTRY_PATH` is set too, to a file of the same stem: the gateway only imports
    that file at start when it exists, so pointing it here keeps a stray
    `registry.json` in the working directory out of the benchmark. (A gateway from
    before the database kept its registry there, with a `.journal`: `--gateway` on an
    older commit still seeds and copies that.)"""

    db: Path
    registry: Path

    @classmethod
    def fresh(cls, tmp: Path, name: str) -> Store:
        stem = f"{name}-{time.monotonic_ns()}"
        return cls(tmp / f"{stem}.db", tmp / f"{stem}.registry.json")

    def files(self) -> list[Path]:
        """Every file the store can consist of, in a fixed order (so two stores pair up)."""
        db, registry = self.db, self.registry
        return [db, sidecar(db, "-wal"), sidecar(db, "-shm"), registry, sidecar(registry, ".journal")]

    def existing(self) -> list[Path]:
        return [path for path in self.files() if path.exists()]

    def copy_to(self, other: Store) -> None:
        for source, target in zip(self.files(), other.files(), strict=True):
            if source.exists():
                shutil.copyfile(source, target)

    def size(self) -> int:
        return sum(path.stat().st_size for path in self.existing())

    def env(self) -> dict[str, str]:
        return {"DB_PATH": str(self.db), "REGISTRY_PATH": str(self.registry)}


@dataclass(frozen=True)
class NodeStore(Store):
    """The reference Node gateway's store: `registry.json`, which it reads and writes beside its own
    `server.ts` (`path.join(__dirname, 'registry.json')`) and nowhere else. So a store is a
    directory of its own (`db`; there is no database), and the server runs a copy of `server.ts` in it."""

    @classmethod
    def fresh(cls, tmp: Path, name: str) -> NodeStore:
        directory = tmp / f"{name}-{time.monotonic_ns()}"
        directory.mkdir(parents=True)
        return cls(directory, directory / "registry.json")

    def files(self) -> list[Path]:
        return [self.registry]

    def env(self) -> dict[str, str]:
        return {}  # it reads only PORT


# --- Servers -------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server process of a kind."""

    kind: str  # "gateway" or "ceiling": the label in the results
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    port_flag: bool = False  # pass --port/--host as flags instead of PORT/HOST env
    uses_registry: bool = True

    def launch(self, logdir: Path, *, store: Store | None = None) -> Running:
        return Running(self, logdir, store)

    def fresh_store(self, tmp: Path, name: str) -> Store:
        """A new, empty store of the kind this server keeps."""
        return Store.fresh(tmp, name)


class Running:
    """A started server: `async with spec.launch(...) as server:`."""

    def __init__(self, spec: ServerSpec, logdir: Path, store: Store | None) -> None:
        self.spec, self.logdir, self.store = spec, logdir, store
        self.port = free_port()
        self.procs: list[asyncio.subprocess.Process] = []

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(HOST, self.port)]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def cpu(self) -> float:
        """CPU seconds of the server processes and their children (helper processes work for them)."""
        return sum(cpu_seconds(p) for pid in self.pids for p in with_descendants(pid))

    def cpu_parts(self) -> dict[str, float]:
        """CPU seconds by process, for servers of several processes; one process has no breakdown."""
        return {}

    def rss(self) -> int:
        """RSS of the server processes themselves, where connections live."""
        return sum(rss_bytes(pid) for pid in self.pids)

    def rss_tree(self) -> int:
        return sum(rss_bytes(p) for pid in self.pids for p in with_descendants(pid))

    async def __aenter__(self) -> Running:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        """(argv, environment, working directory) of the server process."""
        env = {**os.environ, **self.spec.env}
        argv = [*self.spec.argv]
        if self.spec.port_flag:
            argv += ["--host", HOST, "--port", str(self.port)]
        env.update(HOST=HOST, PORT=str(self.port))
        if self.store is not None:
            env.update(self.store.env())
        # In the temp dir: whatever a server writes by a default relative path stays out of the repository.
        return argv, env, self.logdir

    async def start(self, timeout: float = 30.0) -> None:
        argv, env, cwd = self.command()
        argv = [*pinned(SERVER_CPU), *argv]
        self.log_path = self.logdir / f"{self.spec.kind}-{self.port}.log"
        with open(self.log_path, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                cwd=cwd, preexec_fn=_die_with_parent,
            )  # fmt: skip
        self.procs.append(proc)
        log.info("started %s pid %d on port %d (log %s)", self.spec.kind, proc.pid, self.port, self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                break
            if await self.health() is not None:
                return
            await asyncio.sleep(0.05)
        await self.stop()
        raise RuntimeError(f"{self.spec.kind} did not start: {self.log_tail()}")

    async def health(self) -> dict[str, Any] | None:
        http = HttpClient(HOST, self.port)
        try:
            async with asyncio.timeout(5):
                status, body = await http.request("GET", "/health")
            return json.loads(body) if status == 200 else None
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            return None
        finally:
            await http.aclose()

    async def stop(self) -> list[int | None]:
        """SIGTERM each process and wait for it; returns their exit codes."""
        procs, self.procs = self.procs, []
        codes = []
        for proc in procs:
            codes.append(code := await stop_pid(proc))
            if code not in (0, -signal.SIGTERM):
                log.warning("%s pid %d exited with %s: %s", self.spec.kind, proc.pid, code, self.log_tail())
        return codes

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --- The reference Node gateway ------------------------------------------------------

# Its README's benchmark-only edit, applied with sed exactly as written there.
RATE_LIMIT_SED = "s/^const RATE_LIMIT_PER_MINUTE = 60;/const RATE_LIMIT_PER_MINUTE = 1e12;/"
RATE_LIMIT_BEFORE = re.compile(r"^const RATE_LIMIT_PER_MINUTE = 60;", re.MULTILINE)
RATE_LIMIT_AFTER = re.compile(r"^const RATE_LIMIT_PER_MINUTE = 1e12;", re.MULTILINE)
# `node --import tsx server.ts` runs the same program as the README's `./node_modules/.bin/tsx server.ts`
# (tsx's loader transpiles server.ts at load), in one process instead of tsx's CLI and a node child: the PID
# we start is the server, so its RSS and CPU are the server's. `node_loopback.cjs` makes its
# `server.listen(port)` (every interface) listen on 127.0.0.1 only; nothing else is touched.
NODE_ARGV = ("node", "--require", str(BENCH_DIR / "node_loopback.cjs"), "--import", "tsx", "server.ts")
NPM_TIMEOUT_S = 240.0


class NodeInstall:
    """The reference gateway, ready to run: its source copied to `<run temp dir>/node-gateway`, its
    dependencies installed there once per harness run (`npm ci --no-audit --no-fund`, or `npm install`
    when the lock file does not allow `ci`), the rate limit lifted with its README's sed (checked).

    `skipped` says why it cannot run at all (npm or node missing: the harness goes on without it);
    `error` why its installation failed (every node record fails with it)."""

    def __init__(self, source: Path, tmp: Path) -> None:
        self.source, self.tmp = source, tmp
        self.dir = tmp / "node-gateway"
        self.runs = self.dir / "runs"  # the servers' stores, under `dir` so that `node_modules` resolves
        self.script = self.dir / "server.ts"
        self.skipped: str | None = None
        self.error: str | None = None
        self.info: dict[str, Any] = {"source": str(source)}

    @property
    def ready(self) -> bool:
        return self.script.is_file() and not (self.skipped or self.error)

    async def prepare(self) -> None:
        """Install once (a second call does nothing); never raises: sets `skipped` or `error`."""
        if self.ready or self.skipped or self.error:
            return
        for tool in ("npm", "node"):
            if shutil.which(tool) is None:
                self.skipped = f"{tool} not found"
                return
        t0 = time.monotonic()
        try:
            await self._install()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("node server unavailable: %s (logs in %s)", self.error, self.tmp)
            return
        self.info["install_s"] = round(time.monotonic() - t0, 1)
        log.info("node gateway installed in %s in %.1fs: %s", self.dir, self.info["install_s"],
                 {k: v for k, v in self.info.items() if k != "source"})  # fmt: skip

    async def _install(self) -> None:
        source_ts = self.source / "server.ts"
        if not source_ts.is_file():
            raise RuntimeError(f"no server.ts in {self.source} (--node-source)")
        text = source_ts.read_text()
        if len(RATE_LIMIT_BEFORE.findall(text)) != 1:
            raise RuntimeError(f"the rate-limit line `const RATE_LIMIT_PER_MINUTE = 60;` is not (once) in "
                               f"{source_ts}: the README's sed would not lift the limit")  # fmt: skip
        # The source is read-only and keeps no node_modules or registry of its own here; copy what it has.
        shutil.copytree(self.source, self.dir, ignore=shutil.ignore_patterns("node_modules", "registry.json"))
        for path in [self.dir, *self.dir.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
        self.info["server_ts_sha256"] = hashlib.sha256(source_ts.read_bytes()).hexdigest()
        await self._sed()
        if (self.dir / "package-lock.json").is_file():
            try:
                await self._run(["npm", "ci", "--no-audit", "--no-fund"], "npm-ci")
                self.info["install"] = "npm ci --no-audit --no-fund"
            except RuntimeError as exc:  # e.g. a lock file out of step with package.json
                log.warning("node gateway: %s; trying npm install", exc)
                await self._run(["npm", "install", "--no-audit", "--no-fund"], "npm-install")
                self.info["install"] = "npm install --no-audit --no-fund (npm ci failed)"
        else:
            await self._run(["npm", "install", "--no-audit", "--no-fund"], "npm-install")
            self.info["install"] = "npm install --no-audit --no-fund (no package-lock.json)"
        for package in ("tsx", "ws"):
            manifest = self.dir / "node_modules" / package / "package.json"
            if not manifest.is_file():
                raise RuntimeError(f"{package} is not installed in {self.dir / 'node_modules'}")
            self.info[package] = json.loads(manifest.read_text())["version"]
        self.info["node"] = (await self._run(["node", "--version"], "node-version")).strip()

    async def _sed(self) -> None:
        """The README's `sed -i ... server.ts`, then a check that it took effect."""
        await self._run(["sed", "-i", RATE_LIMIT_SED, "server.ts"], "sed")
        text = self.script.read_text()
        if RATE_LIMIT_BEFORE.search(text) or not RATE_LIMIT_AFTER.search(text):
            raise RuntimeError(f"sed did not lift the rate limit in {self.script}")
        self.info["patched_sha256"] = hashlib.sha256(self.script.read_bytes()).hexdigest()

    async def _run(self, argv: list[str], name: str, timeout: float = NPM_TIMEOUT_S) -> str:
        """Run a setup command in `dir` (its output in `<tmp>/node-setup-<name>.log`); its stdout, or RuntimeError."""
        log_path = self.tmp / f"node-setup-{name}.log"
        with open(log_path, "ab") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=self.dir, stdout=asyncio.subprocess.PIPE, stderr=err, stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), timeout)
                err.write(out)
            except TimeoutError:
                await stop_pid(proc, grace=5.0)
                raise RuntimeError(
                    f"`{' '.join(argv)}` did not finish within {timeout:.0f}s (see {log_path})"
                ) from None
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"`{' '.join(argv)}` exited with {proc.returncode}: {' / '.join(tail)} (see {log_path})")
        return out.decode(errors="replace")


@dataclass(frozen=True, kw_only=True)
class NodeSpec(ServerSpec):
    """The reference Node gateway, from `install` (prepared by run.py before the first scenario)."""

    install: NodeInstall

    def launch(self, logdir: Path, *, store: Store | None = None) -> NodeRunning:
        return NodeRunning(self, logdir, store)

    def fresh_store(self, tmp: Path, name: str) -> NodeStore:
        return NodeStore.fresh(self.install.runs, name)


class NodeRunning(Running):
    """A started reference gateway: `server.ts` (the patched copy) in its store's directory, beside
    its `registry.json` (`[]` when the store has none, as its README's `echo '[]' > registry.json`)."""

    spec: NodeSpec

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        install = self.spec.install
        if not install.ready:
            reason = install.skipped or install.error or "not installed"
            raise RuntimeError(f"node server unavailable: {reason}")
        if self.store is None:
            self.store = self.spec.fresh_store(self.logdir, self.spec.kind)
        workdir = self.store.registry.parent
        shutil.copyfile(install.script, workdir / "server.ts")
        if not self.store.registry.exists():
            self.store.registry.write_text("[]\n")
        # tsx caches what it transpiles under os.tmpdir(): keep that in the run's temp dir too.
        scratch = install.dir / "tmp"
        scratch.mkdir(exist_ok=True)
        env = {**os.environ, **self.spec.env, "PORT": str(self.port), "TMPDIR": str(scratch)}
        return [*self.spec.argv], env, workdir


@dataclass(frozen=True)
class ClusterSpec:
    """Several gateway processes sharing one redis-server (`REDIS_URL`): one gateway.

    The registry lives in Redis, so there is no store to prepare: a scenario
    registers its meshes over HTTP, with any process."""

    kind: str
    gateway: ServerSpec
    processes: int = 3
    uses_registry: bool = False

    @property
    def argv(self) -> Sequence[str]:
        return self.gateway.argv

    def launch(self, logdir: Path, *, store: Store | None = None) -> Cluster:
        return Cluster(self, logdir)


class Cluster:
    """A started cluster: redis-server and the gateways on CPU 0, each gateway with its own
    port and a fresh, empty store (DB_PATH). Up when every gateway's /health is 200 (Redis connected)."""

    def __init__(self, spec: ClusterSpec, logdir: Path) -> None:
        self.spec, self.logdir = spec, logdir
        self.redis_port = free_port()
        self.redis: asyncio.subprocess.Process | None = None
        env = {**spec.gateway.env, "REDIS_URL": f"redis://{HOST}:{self.redis_port}/0"}
        member = dataclasses.replace(spec.gateway, kind=spec.kind, env=env)
        stores = [Store.fresh(logdir, f"{spec.kind}-{i}") for i in range(spec.processes)]
        self.gateways = [Running(member, logdir, store) for store in stores]

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [endpoint for g in self.gateways for endpoint in g.endpoints]

    @property
    def pids(self) -> list[int]:
        return [*([self.redis.pid] if self.redis else []), *(pid for g in self.gateways for pid in g.pids)]

    def cpu_parts(self) -> dict[str, float]:
        """CPU seconds by process: `redis` and `gw0`, `gw1`, ... (each with its helper processes)."""
        parts = {f"gw{i}": g.cpu() for i, g in enumerate(self.gateways)}
        parts["redis"] = cpu_seconds(self.redis.pid) if self.redis else 0.0
        return parts

    def cpu(self) -> float:
        return sum(self.cpu_parts().values())

    def rss(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids)

    def rss_tree(self) -> int:
        return sum(rss_bytes(p) for pid in self.pids for p in with_descendants(pid))

    async def health(self) -> dict[str, Any] | None:
        """The first gateway's /health (`clusterConnected` counts every process's meshes)."""
        return await self.gateways[0].health()

    async def connected(self) -> dict[int, int | None]:
        """Port -> meshes connected to that process, from each one's /health."""
        return {g.port: (await g.health() or {}).get("connected") for g in self.gateways}

    async def agree(self, meshes: int, timeout: float = 10.0) -> bool:
        """Until every process sees `meshes` connected cluster-wide (`clusterConnected`): a process
        that has not heard of a mesh on another one yet would keep relays for it, not send them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            views = [(await g.health() or {}).get("clusterConnected") for g in self.gateways]
            if all(view == meshes for view in views):
                return True
            await asyncio.sleep(0.05)
        return False

    async def __aenter__(self) -> Cluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        try:
            await self._start_redis()
            started = await asyncio.gather(*(g.start() for g in self.gateways), return_exceptions=True)
            if failed := [e for e in started if isinstance(e, BaseException)]:
                raise failed[0]
        except BaseException:
            await self.stop()
            raise

    async def _start_redis(self, timeout: float = 10.0) -> None:
        workdir = self.logdir / f"redis-{self.redis_port}"
        workdir.mkdir()
        argv = [
            *pinned(SERVER_CPU), "redis-server", "--port", str(self.redis_port), "--bind", HOST,
            "--save", "", "--appendonly", "no", "--dir", str(workdir),
        ]  # fmt: skip
        with open(self.logdir / f"redis-{self.redis_port}.log", "ab") as out:
            self.redis = await asyncio.create_subprocess_exec(
                *argv, stdout=out, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        log.info("started redis-server pid %d on port %d", self.redis.pid, self.redis_port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.redis.returncode is None:
            if await redis_ping(self.redis_port):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"redis-server did not start (see redis-{self.redis_port}.log)")

    async def stop(self) -> list[int | None]:
        """Gateways first (they withdraw their presence from Redis), then redis-server."""
        codes = [code for gateway in self.gateways for code in await gateway.stop()]
        redis, self.redis = self.redis, None
        if redis is not None:
            codes.append(code := await stop_pid(redis))
            if code not in (0, -signal.SIGTERM):
                log.warning("redis-server pid %d exited with %s", redis.pid, code)
        return codes


async def redis_ping(port: int) -> bool:
    try:
        async with asyncio.timeout(2):
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                writer.write(b"PING\r\n")
                return await reader.readline() == b"+PONG\r\n"
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False


Spec = ServerSpec | ClusterSpec
Server = Running | Cluster


# --- Load generator workers ------------------------------------------------------


class Worker:
    """One `loadgen.py` process, spoken to over its stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc, self.name = proc, name
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, job: dict[str, Any], logdir: Path, name: str) -> Worker:
        with open(logdir / f"loadgen-{name}.log", "ab") as err:
            proc = await asyncio.create_subprocess_exec(
                *pinned(LOAD_CPU), PYTHON, str(BENCH_DIR / "loadgen.py"),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                limit=1 << 28,  # a result line carries the latency samples
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        worker = cls(proc, name)
        worker.send(json.dumps(job))
        return worker

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.is_closing():
            self.proc.stdin.write(line.encode() + b"\n")

    async def event(self, event: str, timeout: float) -> dict[str, Any]:
        """The first `event` line, also if it came already while another one was awaited (events
        whose order between two kinds is not fixed, e.g. a storm worker's `groups` and `done`)."""
        for message in self.events:
            if message["event"] == event:
                return message
        return await self.expect(event, timeout)

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next `event` line (earlier events are kept in `events`)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"loadgen {self.name} exited ({await self.proc.wait()}) before {event!r}")
                message = json.loads(line)
                self.events.append(message)
                if message["event"] == event:
                    return message


class Fleet:
    """A group of workers started together: `async with Fleet(logdir) as fleet:`."""

    def __init__(self, logdir: Path, name: str) -> None:
        self.logdir, self.name = logdir, name
        self.workers: list[Worker] = []

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for worker in self.workers:
            await stop_pid(worker.proc, grace=2.0)

    async def start(self, jobs: list[dict[str, Any]], timeout: float = 120.0) -> None:
        for i, job in enumerate(jobs):
            self.workers.append(await Worker.start(job, self.logdir, f"{self.name}-{i}"))
        await self.expect("ready", timeout)

    def send(self, line: str) -> None:
        for worker in self.workers:
            worker.send(line)

    async def expect(self, event: str, timeout: float) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.expect(event, timeout) for w in self.workers)))

    async def results(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        self.send("stop")
        return await self.expect("result", timeout)
