"""A driver killed with SIGKILL leaves Ray agents running under PID 1; the next local Ray start ends them, and
never touches a cluster that is still alive."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from avcache.pipeline.runners import _ray_processes, end_leftover_ray_processes

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc (Linux only)")]

DRIVER = textwrap.dedent("""
    import sys, ray
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.get(ray.remote(lambda: 1).remote())  # a worker process too
    print(ray._private.worker._global_node.session_name, flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills us)
    ray.shutdown()
""")


def start_driver() -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    session = proc.stdout.readline().strip()
    assert session.startswith("session_"), f"driver failed to start Ray (exit {proc.poll()})"
    return proc, session


def running(session: str) -> dict[int, str]:
    return {p.pid: p.command for p in _ray_processes() if p.session == session and p.state != "Z"}


def wait_for(condition, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_a_killed_drivers_leftovers_are_ended_and_a_live_cluster_is_not():
    killed, killed_session = start_driver()
    alive, alive_session = start_driver()
    try:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        # the GCS server and raylet die with their driver; what outlives them is what we must end
        assert wait_for(lambda: not any("gcs_server" in c for c in running(killed_session).values()))
        left = running(killed_session)
        assert left, "nothing outlived the killed driver: this test no longer shows the leak it guards against"
        alive_before = running(alive_session)

        messages: list[str] = []
        ended = end_leftover_ray_processes(log=messages.append)

        assert set(left) <= set(ended)
        assert running(killed_session) == {}
        assert running(alive_session) == alive_before  # the live cluster keeps every process
        assert messages and killed_session in messages[0] and alive_session not in messages[0]
    finally:
        if killed.poll() is None:
            killed.kill()
        alive.stdin.close()
        try:
            alive.wait(timeout=60)
        except subprocess.TimeoutExpired:
            alive.kill()
