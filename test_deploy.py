"""The deploy files: compose.yaml, Dockerfile, railway.json, deploy/nginx.conf and pyproject.toml.

Static checks for what cannot run here (there is no Docker engine: nothing is built), then the
real thing where it can: `nginx -t` on the config, the Dockerfile's HEALTHCHECK command against a
real gateway, and `python gateway.py` behind a real nginx (loopback only), registered, connected
and relayed through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Iterable
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from websockets.asyncio.client import ClientConnection, connect

import gateway as gw
from conftest import free_port

HERE = Path(__file__).parent
DOCKERFILE = HERE / "Dockerfile"
COMPOSE = HERE / "compose.yaml"
NGINX_CONF = HERE / "deploy" / "nginx.conf"
RAILWAY = HERE / "railway.json"

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx; .ci/run does)")

GATEWAY_PORT = 4000  # the Dockerfile's EXPOSE and the gateway's default PORT
PING_INTERVAL_S = gw.Settings().ping_interval_s


# --- Reading the files ------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            steps.append((word.upper(), rest.strip()))
    return steps


def exec_form(arguments: str) -> list[str]:
    form = json.loads(arguments)
    assert isinstance(form, list) and all(isinstance(part, str) for part in form), arguments
    return form


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's command, in exec form: options first, then `CMD [...]`."""
    (arguments,) = [rest for word, rest in dockerfile() if word == "HEALTHCHECK"]
    _, found, command = arguments.partition("CMD ")
    assert found, f"HEALTHCHECK without CMD: {arguments}"
    return exec_form(command)


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def gateway_services(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in services.items() if name.startswith("gateway")}


def nginx_directives(name: str) -> list[str]:
    """The arguments of every `name ...;` directive in deploy/nginx.conf (comments dropped)."""
    text = "\n".join(line.partition("#")[0] for line in NGINX_CONF.read_text().splitlines())
    return [match.strip() for match in re.findall(rf"(?m)^\s*{re.escape(name)}\s+([^;{{}}\n]*);", text)]


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[unit]


MARKED = re.compile(
    r"^(?P<indent>\s*)(?P<directive>[^#\s][^#]*?)\s*#\s*(?P<marker>gateway-upstream|listen-port|access-log|temp-path)\s*$"
)


def render_nginx(tmp: Path, upstreams: Iterable[str], listen: str) -> Path:
    """deploy/nginx.conf for loopback: the marked lines get our gateway(s), our listen address, and
    an access log and temp paths inside `tmp` (nothing under /var)."""
    out: list[str] = []
    seen: dict[str, int] = {}
    for line in NGINX_CONF.read_text().splitlines():
        found = MARKED.match(line)
        if found is None:
            out.append(line)
            continue
        indent, directive, marker = found["indent"], found["directive"], found["marker"]
        seen[marker] = seen.get(marker, 0) + 1
        if marker == "gateway-upstream":
            if seen[marker] == 1:
                out += [f"{indent}server {upstream};" for upstream in upstreams]
        elif marker == "listen-port":
            out.append(f"{indent}listen {listen};")
        elif marker == "access-log":
            out.append(f"{indent}access_log {tmp / 'access.log'};")
        else:  # temp-path: `<name>_temp_path <dir>;` -> the same directory name inside tmp
            name, path = directive.rstrip(";").split()
            out.append(f"{indent}{name} {tmp / Path(path).name};")
    assert seen.keys() == {"gateway-upstream", "listen-port", "access-log", "temp-path"}, f"markers found: {seen}"
    rendered = tmp / "nginx.conf"
    rendered.write_text("\n".join(out) + "\n")
    return rendered


# --- compose.yaml ---------------------------------------------------------------


def test_compose_runs_three_gateways_on_redis() -> None:
    services = compose()["services"]
    gateways = gateway_services(services)
    assert sorted(gateways) == ["gateway1", "gateway2", "gateway3"]
    for name, service in gateways.items():
        build = service["build"]
        assert (build if isinstance(build, str) else build.get("context", ".")) == ".", name  # the Dockerfile
        env = environment(service)
        assert env["REDIS_URL"] == "redis://redis:6379/0", name
        assert "redis" in service["depends_on"], name
        assert "ports" not in service, f"{name}: only nginx is published"


def test_compose_redis_keeps_an_append_only_file() -> None:
    spec = compose()
    redis = spec["services"]["redis"]
    assert redis["image"] == "redis:7"
    command = redis["command"]
    assert "--appendonly yes" in (command if isinstance(command, str) else " ".join(command))
    (volume,) = [v for v in redis["volumes"] if v.split(":")[1] == "/data"]
    assert volume.split(":")[0] in spec["volumes"], "Redis data is on a named volume"


def test_compose_nginx_mounts_the_config_and_fronts_every_gateway() -> None:
    spec = compose()
    services = spec["services"]
    nginx = services["nginx"]
    assert nginx["image"].split(":")[0] == "nginx"
    mounts = [v.split(":") for v in nginx["volumes"]]
    assert ["./deploy/nginx.conf", "/etc/nginx/nginx.conf"] in [m[:2] for m in mounts]
    assert "8080:8080" in [str(p) for p in nginx["ports"]]
    depends = nginx["depends_on"]
    assert set(gateway_services(services)) <= set(depends if isinstance(depends, list) else depends.keys())
    # One source of truth between the files: nginx's upstream is exactly the compose gateways.
    assert sorted(nginx_directives("server")) == sorted(f"{name}:{GATEWAY_PORT}" for name in gateway_services(services))


def test_compose_gateways_believe_only_nginx_for_the_client_ip() -> None:
    spec = compose()
    services = spec["services"]
    address = services["nginx"]["networks"]["mesh"]["ipv4_address"]
    (pool,) = spec["networks"]["mesh"]["ipam"]["config"]
    assert ip_address(address) in ip_network(pool["subnet"])
    assert ip_address(address) not in ip_network(pool["ip_range"]), "a fixed address outside the dynamic range"
    for name, service in gateway_services(services).items():
        assert environment(service)["FORWARDED_ALLOW_IPS"] == address, name


# --- Dockerfile -------------------------------------------------------------------


def test_dockerfile_runs_the_gateway_as_a_non_root_user() -> None:
    steps = dockerfile()
    words = [word for word, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert words.index("USER") < words.index("CMD")
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert re.search(rf"useradd\b.*\b{re.escape(users[-1])}\b", runs), "the user is created in the image"
    assert "pip install --no-cache-dir -r requirements.txt" in runs
    copied = " ".join(rest for word, rest in steps if word == "COPY")
    assert "requirements.txt" in copied and "gateway.py" in copied and "gateway_redis.py" in copied
    assert [exec_form(rest) for word, rest in steps if word == "CMD"] == [["python", "gateway.py"]]
    assert [rest for word, rest in steps if word == "EXPOSE"] == [str(GATEWAY_PORT)]


def test_dockerfile_keeps_state_on_a_volume_the_user_owns() -> None:
    steps = dockerfile()
    env = dict(pair.split("=", 1) for word, rest in steps if word == "ENV" for pair in shlex.split(rest))
    assert env["DB_PATH"] == "/data/gateway.db"
    volumes = [rest for word, rest in steps if word == "VOLUME"]
    assert volumes and "/data" in [
        v for rest in volumes for v in (exec_form(rest) if rest.startswith("[") else rest.split())
    ]
    user = [rest for word, rest in steps if word == "USER"][-1]
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert re.search(rf"chown\s+{re.escape(user)}(:\S+)?\s+/data\b", runs), "/data belongs to the user"


def test_dockerfile_healthcheck_asks_health_without_curl() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"], "no curl in the slim image: the stdlib asks"
    assert "/health" in command[2] and "urllib" in command[2]


# --- railway.json ------------------------------------------------------------------


def test_railway_starts_the_gateway_and_checks_health() -> None:
    config = json.loads(RAILWAY.read_text())
    assert config["$schema"] == "https://railway.com/railway.schema.json"
    assert config["deploy"]["startCommand"] == "python gateway.py"
    assert config["deploy"]["healthcheckPath"] == "/health"
    assert config["build"]["builder"] in ("DOCKERFILE", "RAILPACK")
    # The same command everywhere: Procfile, Dockerfile, Railway.
    assert (HERE / "Procfile").read_text().strip() == f"web: {config['deploy']['startCommand']}"
    assert (
        " ".join(exec_form(next(rest for word, rest in dockerfile() if word == "CMD")))
        == config["deploy"]["startCommand"]
    )


# --- pyproject.toml -----------------------------------------------------------------


def test_pyproject_installs_gateway_with_the_runtime_requirements() -> None:
    pyproject = tomllib.loads((HERE / "pyproject.toml").read_text())
    project = pyproject["project"]
    runtime = [line.split("#")[0].strip() for line in (HERE / "requirements.txt").read_text().splitlines()]
    assert sorted(project["dependencies"]) == sorted(line for line in runtime if line)
    assert pyproject["tool"]["setuptools"]["py-modules"] == ["gateway", "gateway_redis"]
    assert "setuptools" in " ".join(pyproject["build-system"]["requires"])
    if (version := getattr(gw, "VERSION", None)) is not None:  # `python gateway.py --version`
        assert project["version"] == version
    assert "test_deploy.py" in pyproject["tool"]["pytest"]["ini_options"]["testpaths"]


# --- deploy/nginx.conf -------------------------------------------------------------


def test_nginx_conf_is_whole_and_proxies_websockets() -> None:
    text = NGINX_CONF.read_text()
    assert re.search(r"(?m)^events\s*\{", text) and re.search(r"(?m)^http\s*\{", text), "a whole nginx.conf"
    assert nginx_directives("listen") == ["8080"]
    assert nginx_directives("proxy_pass") == ["http://mesh_gateway"]
    assert nginx_directives("proxy_http_version") == ["1.1"]
    headers = dict(h.split(None, 1) for h in nginx_directives("proxy_set_header"))
    assert headers["Upgrade"] == "$http_upgrade"
    assert headers["Connection"] == "$connection_upgrade" and "default upgrade" in text
    assert headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    (timeout,) = nginx_directives("proxy_read_timeout")
    assert seconds(timeout) > PING_INTERVAL_S, "a quiet socket outlives the gateway's ping interval"


@needs_nginx
def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    assert NGINX is not None
    conf = render_nginx(tmp_path, ["127.0.0.1:4001", "127.0.0.1:4002", "127.0.0.1:4003"], f"127.0.0.1:{free_port()}")
    command = [NGINX, "-t", "-c", str(conf), *nginx_paths(tmp_path)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


# --- Real processes --------------------------------------------------------------------


def nginx_paths(tmp: Path) -> list[str]:
    """Everything nginx would otherwise write under /var or /run goes into `tmp`."""
    log = tmp / "error.log"
    return ["-p", str(tmp), "-e", str(log), "-g", f"pid {tmp / 'nginx.pid'}; error_log {log};"]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), so a stopped parent leaves nothing behind."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            child, ppid = int(stat.parent.name), int(stat.read_text().rpartition(")")[2].split()[1])
            parents.setdefault(ppid, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited (its parent is gone or has not reaped it yet)


async def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop `proc` by its PID, then whatever it started that outlives it (by PID too)."""
    below = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 5)
    deadline = time.monotonic() + 5
    while (left := [pid for pid in below if alive(pid)]) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def gateway_process(tmp_path: Path) -> AsyncIterator[int]:
    """`python gateway.py` as the Dockerfile and Railway run it; yields its port once /health answers."""
    port = free_port()
    settings = {name.upper() for name in gw.Settings.__struct_fields__}
    env = {key: value for key, value in os.environ.items() if key not in settings}  # no REDIS_URL etc. from outside
    env |= {
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "DB_PATH": str(tmp_path / "gateway.db"),
        "REGISTRY_PATH": str(tmp_path / "registry.json"),
        "REGISTER_PER_MIN": "100000",
    }
    log_path = tmp_path / f"gateway-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "gateway.py")], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            async with httpx.AsyncClient(timeout=1) as http, asyncio.timeout(20):
                while True:
                    assert proc.poll() is None, log_path.read_text()
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                            break
                    await asyncio.sleep(0.05)
            yield port
        finally:
            await stop(proc)


@contextlib.asynccontextmanager
async def nginx_process(tmp_path: Path, upstream_port: int) -> AsyncIterator[int]:
    """nginx in the foreground with deploy/nginx.conf rendered for loopback; yields its port once it listens."""
    port = free_port()
    conf = render_nginx(tmp_path, [f"127.0.0.1:{upstream_port}"], f"127.0.0.1:{port}")
    assert NGINX is not None
    with open(tmp_path / "nginx.out", "wb") as out:
        *paths, globals_ = nginx_paths(tmp_path)  # ends with the -g directives: run in the foreground too
        proc = subprocess.Popen(
            [NGINX, "-c", str(conf), *paths, f"daemon off; {globals_}"], stdout=out, stderr=subprocess.STDOUT
        )
        try:
            async with asyncio.timeout(15):
                while True:
                    assert proc.poll() is None, "".join(
                        path.read_text() for path in (tmp_path / "nginx.out", tmp_path / "error.log") if path.exists()
                    )
                    with contextlib.suppress(OSError):
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                        writer.close()
                        await writer.wait_closed()
                        break
                    await asyncio.sleep(0.05)
            yield port
        finally:
            await stop(proc)


async def expect(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next frame of type `kind` (frames of other types are skipped), within 10 s."""
    async with asyncio.timeout(10):
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == kind:
                return frame


async def test_healthcheck_command_tells_up_from_down(tmp_path: Path) -> None:
    """The Dockerfile's HEALTHCHECK, run as Docker would (`python` is this interpreter)."""
    command = [sys.executable, *healthcheck_command()[1:]]
    async with gateway_process(tmp_path) as port:
        up = await asyncio.to_thread(
            subprocess.run, command, env=os.environ | {"PORT": str(port)}, capture_output=True, timeout=30, check=False
        )
        assert up.returncode == 0, up.stderr
    down = await asyncio.to_thread(
        subprocess.run, command, env=os.environ | {"PORT": str(port)}, capture_output=True, timeout=30, check=False
    )
    assert down.returncode != 0


@needs_nginx
async def test_register_connect_and_relay_through_nginx(tmp_path: Path) -> None:
    async with gateway_process(tmp_path) as gateway_port, nginx_process(tmp_path, gateway_port) as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for mesh_id, name in (("deploy-a", "Deploy A"), ("deploy-b", "Deploy B")):
                answer = await http.post(
                    "/register", json={"meshId": mesh_id, "secret": f"{mesh_id}-secret", "name": name}
                )
                assert (answer.status_code, answer.json()) == (200, {"ok": True, "created": True}), answer.text
            url = f"ws://127.0.0.1:{port}/gateway"
            async with connect(url, open_timeout=10) as a, connect(url, open_timeout=10) as b:
                for ws, mesh_id, name in ((a, "deploy-a", "Deploy A"), (b, "deploy-b", "Deploy B")):
                    await ws.send(
                        json.dumps({"type": "gateway_auth", "meshId": mesh_id, "secret": f"{mesh_id}-secret"})
                    )
                    assert await expect(ws, "gateway_auth_ok") == {
                        "type": "gateway_auth_ok",
                        "meshId": mesh_id,
                        "name": name,
                    }
                message = {"content": "hello through nginx", "trustLevel": "local", "internal": "dropped"}
                relay = {
                    "type": "gateway_relay",
                    "targetMeshId": "deploy-b",
                    "id": "r1",
                    "payload": {"type": "chat", "message": message, "x": 1},
                }
                await a.send(json.dumps(relay))
                incoming = await expect(b, "gateway_incoming")
                assert incoming == {
                    "type": "gateway_incoming",
                    "fromMeshId": "deploy-a",
                    "fromMeshName": "Deploy A",
                    "payload": {
                        "type": "chat",
                        "message": {"content": "hello through nginx", "trustLevel": "federated"},
                    },
                }
                assert await expect(a, "gateway_ack") == {
                    "type": "gateway_ack",
                    "id": "r1",
                    "delivered": 1,
                    "queued": 0,
                }
                health = await http.get("/health")
                assert health.status_code == 200, health.text
                assert health.json()["ok"] is True and health.json()["connected"] == 2
    access = (tmp_path / "access.log").read_text()
    assert 'GET /gateway HTTP/1.1" 101' in access and "POST /register" in access, access
