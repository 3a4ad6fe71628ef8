"""A real Duplex deployment on loopback: redis-server, N ``duplex serve`` replicas and nginx
in front, configured from deploy/nginx.conf (only the upstream addresses and the listen
port are replaced). Used by tests/test_replicas.py and bench/bench_failover.py.

Each replica is a ``python -m server.cli serve`` process with ``DUPLEX_REPLICA_ID=r<i>``,
so the owner of a session can be read from its lease in Redis.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
TOKEN = "cluster-token"
PREFIX = "duplex:"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nginx_config(snippet: str, upstreams: list[int], listen: int, prefix: Path) -> str:
    """deploy/nginx.conf (an http-level snippet) as a whole config for ``nginx -p prefix``:
    upstream servers and listen port swapped for loopback ones, files kept in ``prefix``."""
    lines = re.findall(r"^\s*server duplex-\d+:8000([^;]*);\s*$", snippet, flags=re.M)
    if not lines:
        raise ValueError("deploy/nginx.conf: no `server duplex-N:8000 ...;` upstream lines")
    params = lines[0]
    servers = "".join(f"    server 127.0.0.1:{port}{params};\n" for port in upstreams)
    body, count = re.subn(
        r"(?:^\s*server duplex-\d+:8000[^;]*;\s*\n)+", servers, snippet, flags=re.M
    )
    body, listens = re.subn(
        r"^(\s*)listen 8000;", rf"\1listen 127.0.0.1:{listen};", body, flags=re.M
    )
    if count != 1 or listens != 1:
        raise ValueError("deploy/nginx.conf: expected one upstream block and one `listen 8000;`")
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "".join(
        f"    {kind}_temp_path {prefix}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log info;\n"
        "events { worker_connections 1024; }\n"
        f"http {{\n    access_log {prefix}/access.log;\n{temp}{body}}}\n"
    )


@dataclass
class ReplicaProc:
    index: int
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def id(self) -> str:
        return f"r{self.index}"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    size: int
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="duplex-cluster-")))
    redis_port: int = field(default_factory=free_port)
    lb_port: int = field(default_factory=free_port)
    replicas: list[ReplicaProc] = field(default_factory=list)
    _redis: subprocess.Popen[bytes] | None = None
    _nginx: subprocess.Popen[bytes] | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def ws_url(self) -> str:
        """The balancer's WebSocket URL (what clients use)."""
        return f"ws://127.0.0.1:{self.lb_port}/v1/duplex"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    # ---- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for tool in ("redis-server", "nginx"):
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                raise RuntimeError(f"{tool} is not installed")
        self._redis = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                *("--port", str(self.redis_port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.redis_port, self._redis, "redis-server")
        self.replicas = [ReplicaProc(i, free_port()) for i in range(self.size)]
        for replica in self.replicas:
            self.start_replica(replica.index, wait=False)
        for replica in self.replicas:
            self.wait_ready(replica.index)
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            nginx_config(
                NGINX_CONF.read_text(), [r.port for r in self.replicas], self.lb_port, self.workdir
            )
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self._nginx = subprocess.Popen(
            [nginx, "-p", str(self.workdir), "-c", str(conf), "-e", str(self.workdir / "err.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.lb_port, self._nginx, "nginx")

    def start_replica(self, index: int, *, wait: bool = True) -> None:
        replica = self.replicas[index]
        log = open(self.workdir / f"{replica.id}.log", "ab")
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DUPLEX_REPLICA_ID": replica.id,
            "DUPLEX_STORE_URL": self.redis_url,
            "DUPLEX_API_TOKENS": f"{TOKEN}:tenant-a",
            "DUPLEX_MAX_CONNECTIONS_PER_CLIENT": "0",  # every connection comes from nginx
            **self.env,
        }
        replica.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(replica.port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if wait:
            self.wait_ready(index)

    def wait_ready(self, index: int, timeout: float = 30) -> None:
        replica = self.replicas[index]
        deadline = time.monotonic() + timeout
        while True:
            assert replica.proc is not None
            if replica.proc.poll() is not None:
                raise RuntimeError(f"replica {replica.id} exited: {self.log(index)[-2000:]}")
            try:
                if httpx.get(replica.base + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica.id} not ready: {self.log(index)[-2000:]}")
            time.sleep(0.05)

    def signal(self, index: int, sig: int) -> None:
        proc = self.replicas[index].proc
        assert proc is not None
        proc.send_signal(sig)

    def wait_exit(self, index: int, timeout: float = 60) -> int:
        proc = self.replicas[index].proc
        assert proc is not None
        return proc.wait(timeout=timeout)

    def log(self, index: int) -> str:
        path = self.workdir / f"{self.replicas[index].id}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                replica.proc.kill()
                replica.proc.wait(timeout=10)
        for proc in (self._nginx, self._redis):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- inspection ---------------------------------------------------------------------

    def owner(self, session_id: str) -> int | None:
        """The index of the replica holding the session's lease, if any."""
        with redis.Redis.from_url(self.redis_url, decode_responses=True) as client:
            value = client.get(f"{PREFIX}lease:{session_id}")
        if not value:
            return None
        return int(value.split(":", 1)[0].removeprefix("r"))


def _wait_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{name} did not start") from None
            time.sleep(0.05)
