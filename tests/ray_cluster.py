"""A Ray cluster started as an operator starts one (`ray start`), on 127.0.0.1 with its own ports and temp dir, and
stopped by pid: nothing of another cluster on the machine (a second test process under `pytest -n`) is touched.

`ray.init()` cannot be given the dashboard agent's port, so every local cluster's agent asks for 52365; only one
gets it, and the Ray job server of the others cannot run jobs. Modules that need a job server start theirs here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil


@dataclass(frozen=True)
class HeadPorts:
    gcs: int
    dashboard: int
    agent: int  # the agent's HTTP port; its metrics port is agent + 1
    client: int
    workers: tuple[int, int]


def ray_start(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", *args, "--disable-usage-stats"],
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout + out.stderr


def processes_of(session: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(session in part for part in p.info["cmdline"] or []):
                found.append(p)
                found += p.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def cluster_env() -> dict[str, str]:
    # Token auth is switched on by `ray start --head` whenever ~/.ray/auth_token exists, but a joining node does
    # not pick the token up (Ray 2.59+); these clusters live on 127.0.0.1 only, so they run without.
    return {**os.environ, "RAY_AUTH_MODE": "disabled"}


def head_args(ports: HeadPorts, temp_dir: Path, num_cpus: int, resources: str | None = None) -> list[str]:
    args = ["--head", "--node-ip-address", "127.0.0.1", "--port", str(ports.gcs), "--num-cpus", str(num_cpus),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports.dashboard),
            "--dashboard-agent-listen-port", str(ports.agent), "--metrics-export-port", str(ports.agent + 1),
            "--ray-client-server-port", str(ports.client), "--min-worker-port", str(ports.workers[0]),
            "--max-worker-port", str(ports.workers[1]), "--temp-dir", str(temp_dir)]
    return args + (["--resources", resources] if resources else [])


@contextmanager
def head_node(ports: HeadPorts, name: str, num_cpus: int = 8, resources: str | None = None) -> Iterator[str]:
    """A head node; yields the session name (the key its processes are found by). Stops them all at exit."""
    temp_dir = Path(f"/tmp/st-{name}-{os.getpid()}")  # short: Ray's unix socket paths have a length limit
    head = ray_start(head_args(ports, temp_dir, num_cpus, resources), cluster_env())
    session = next((p for p in temp_dir.iterdir() if p.name.startswith("session_2")), None)
    assert session is not None, head
    started = {p.pid for p in processes_of(session.name)}
    try:
        yield session.name
    finally:
        stop(session.name, started)


def stop(session: str, started: set[int]) -> None:
    import ray

    ray.shutdown()
    procs = {p.pid: p for p in processes_of(session)} | {p.pid: p for p in map(_process, started) if p is not None}
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    # gcs_server and one python process outlived SIGTERM every time: the gateway module's teardown waited the
    # whole 15 s it then allowed them (21 s in all). The cluster's state is thrown away, so they get 3 s, then KILL.
    _, alive = psutil.wait_procs(list(procs.values()), timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    assert not [p for p in processes_of(session) if _running(p)]


def _process(pid: int) -> psutil.Process | None:
    # Ray's processes exit on their own while the cluster winds down: one gone between a check and a call is
    # stopped, not an error (CI failed on exactly that: NoSuchProcess from psutil.Process after pid_exists).
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
