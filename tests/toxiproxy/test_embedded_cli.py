"""``ddpfault-toxiproxy`` (python -m pytest_ddpfault.toxiproxy.cli) as a subprocess."""

from __future__ import annotations

import json
import os
import pathlib
import re
import selectors
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

ROOT = pathlib.Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 20.0


def _cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "pytest_ddpfault.toxiproxy.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            pytest.fail(f"no startup line within {timeout} s")
    return proc.stdout.readline()


@pytest.fixture
def cli():
    procs: list[subprocess.Popen] = []

    def run(*args: str) -> subprocess.Popen:
        proc = _cli(*args)
        procs.append(proc)
        return proc

    try:
        yield run
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            proc.stdout.close()
            proc.stderr.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_and_stops_on_signal(cli, sig):
    proc = cli("--host", "127.0.0.1", "--port", "0")
    line = _first_line(proc, STARTUP_TIMEOUT)
    match = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", line)
    assert match and int(match.group(2)) > 0, line
    answer = requests.get(match.group(1) + "/version", timeout=5)
    assert answer.json() == {"version": "2.8.0"}
    start = time.monotonic()
    proc.send_signal(sig)
    assert proc.wait(timeout=10) == 0, proc.stderr.read()
    assert time.monotonic() - start < 5


def test_refuses_non_loopback_without_allow_remote(cli):
    proc = cli("--host", "0.0.0.0", "--port", "0")
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "non-loopback" in err and "--allow-remote" in err


def test_port_in_use_exits_1(cli):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        proc = cli("--port", str(holder.getsockname()[1]))
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1 and "cannot listen" in err


@pytest.mark.parametrize("flag", ["-version", "--version"])
def test_version_flag(cli, flag):
    proc = cli(flag)
    out, err = proc.communicate(timeout=20)
    assert (proc.returncode, out, err) == (0, "ddpfault-toxiproxy version 2.8.0\n", "")


def test_real_servers_flags(cli, tmp_path, echo_upstream):
    """toxiproxy-server's spelling: -config FILE, -seed N, -proxy-metrics, -runtime-metrics."""
    config = tmp_path / "proxies.json"
    config.write_text(json.dumps([{"name": "db", "listen": "127.0.0.1:0",
                                   "upstream": echo_upstream.address, "enabled": True}]))
    proc = cli("-port", "0", "-config", str(config), "-seed", "7", "-proxy-metrics",
               "-runtime-metrics")
    url = re.search(r"listening on (http://\S+)", _first_line(proc, STARTUP_TIMEOUT)).group(1)
    assert requests.get(url + "/proxies", timeout=5).json()["db"]["upstream"] == echo_upstream.address
    metrics = requests.get(url + "/metrics", timeout=5)
    assert metrics.status_code == 200 and "process_cpu_seconds_total " in metrics.text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, proc.stderr.read()


def test_bad_config_exits_1(cli, tmp_path):
    config = tmp_path / "proxies.json"
    config.write_text('[{"name": "x"}]')
    proc = cli("--port", "0", "--config", str(config))
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert f"config {config}: missing required field: upstream at proxy 1" in err
