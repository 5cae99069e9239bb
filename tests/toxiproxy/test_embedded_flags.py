"""toxiproxy-server's flags, as EmbeddedToxiproxy arguments: config, seed, /metrics."""

from __future__ import annotations

import json
import re

import pytest
import requests

from pytest_ddpfault.toxiproxy import ConfigError, EmbeddedToxiproxy
from pytest_ddpfault.toxiproxy.metrics import go_float

SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="(\\.|[^"\\])*",?)*\})? \S+$')


@pytest.fixture
def started():
    """Start EmbeddedToxiproxy(**kwargs); every one is stopped afterwards."""
    servers: list[EmbeddedToxiproxy] = []

    def start(**kwargs) -> EmbeddedToxiproxy:
        server = EmbeddedToxiproxy(**kwargs)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop(timeout=5.0)


def _get(server: EmbeddedToxiproxy, path: str) -> requests.Response:
    return requests.get(server.url + path, timeout=5)


# --- config ------------------------------------------------------------------------------


def test_config_file_creates_proxies_at_start(started, tmp_path, echo_upstream, connect, tp):
    config = tmp_path / "proxies.json"
    config.write_text(json.dumps([
        {"name": "echo", "listen": "127.0.0.1:0", "upstream": echo_upstream.address},
        {"name": "off", "listen": "127.0.0.1:0", "upstream": echo_upstream.address,
         "enabled": False},
    ]))
    server = started(config=config)
    proxies = _get(server, "/proxies").json()
    assert sorted(proxies) == ["echo", "off"]
    assert (proxies["echo"]["enabled"], proxies["off"]["enabled"]) == (True, False)
    sock = connect(int(proxies["echo"]["listen"].rsplit(":", 1)[1]))
    sock.sendall(b"ping")
    assert tp.recv_exactly(sock, 4) == b"ping"


@pytest.mark.parametrize("content, message", [
    ('{"name": "x"}', "config {path}: bad request body: json: cannot unmarshal object"),
    ('[{"name": "x"}]', "config {path}: missing required field: upstream at proxy 1"),
    ("[", "config {path}: bad request body: unexpected EOF"),
    (None, "config {path}: No such file or directory"),
])
def test_bad_config_fails_start(tmp_path, content, message):
    config = tmp_path / "proxies.json"
    if content is not None:
        config.write_text(content)
    server = EmbeddedToxiproxy(config=config)
    with pytest.raises(ConfigError) as info:
        server.start()
    assert str(info.value).startswith(message.format(path=config))
    assert not server.running


# --- seed ----------------------------------------------------------------------------------


def _toxicity_pattern(server: EmbeddedToxiproxy, upstream: str, connect, tp) -> list[bool]:
    """Which of 16 connections a toxicity-0.5 ``limit_data`` toxic hit (in order)."""
    api = requests.Session()
    try:
        answer = api.post(server.url + "/proxies", timeout=5, json={
            "name": "p", "upstream": upstream, "listen": "127.0.0.1:0"})
        port = int(answer.json()["listen"].rsplit(":", 1)[1])
        api.post(server.url + "/proxies/p/toxics", timeout=5, json={
            "type": "limit_data", "toxicity": 0.5, "attributes": {"bytes": 1}})
    finally:
        api.close()
    hits = []
    for _ in range(16):
        sock = connect(port)
        sock.sendall(b"ping")
        echoed = b""
        while len(echoed) < 4 and (more := sock.recv(4 - len(echoed))):
            echoed += more
        hits.append(echoed != b"ping")  # a hit: 1 byte, then the connection closes
        sock.close()
    return hits


def test_seed_makes_toxicity_rolls_repeatable(started, echo_upstream, connect, tp):
    first = _toxicity_pattern(started(seed=1234), echo_upstream.address, connect, tp)
    second = _toxicity_pattern(started(seed=1234), echo_upstream.address, connect, tp)
    assert first == second
    assert any(first) and not all(first), first


# --- /metrics ------------------------------------------------------------------------------


def test_no_metrics_route_without_a_metrics_flag(server):
    assert _get(server, "/metrics").status_code == 404


def test_proxy_metrics_count_bytes_per_link(started, echo_upstream, connect, tp):
    server = started(proxy_metrics=True)
    answer = requests.post(server.url + "/proxies", timeout=5, json={
        "name": "echo", "upstream": echo_upstream.address, "listen": "127.0.0.1:0"})
    listen = answer.json()["listen"]
    sock = connect(int(listen.rsplit(":", 1)[1]))
    sock.sendall(b"x" * 1000)
    assert tp.recv_exactly(sock, 1000) == b"x" * 1000

    page = _get(server, "/metrics")
    assert page.status_code == 200
    assert page.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert re.fullmatch(r"[0-9a-v]{20}", page.headers["X-Toxiproxy-Request-Id"])
    lines = page.text.splitlines()
    for kind in ("received", "sent"):
        name = f"toxiproxy_proxy_{kind}_bytes_total"
        assert f"# TYPE {name} counter" in lines
        for direction in ("downstream", "upstream"):
            assert (f'{name}{{direction="{direction}",listener="{listen}",proxy="echo",'
                    f'upstream="{echo_upstream.address}"}} 1000') in lines, page.text
    assert not any(line.startswith(("process_", "python_")) for line in lines)
    assert requests.post(server.url + "/metrics", timeout=5).status_code == 200  # any method


def test_runtime_metrics_are_prometheus_text(started):
    server = started(runtime_metrics=True)
    text = _get(server, "/metrics").text
    names = {line.split("{")[0].split()[0] for line in text.splitlines()
             if not line.startswith("#")}
    assert {"process_cpu_seconds_total", "process_open_fds", "process_max_fds",
            "process_resident_memory_bytes", "process_start_time_seconds",
            "process_virtual_memory_bytes", "python_info"} <= names, names
    assert not any(name.startswith("toxiproxy_") for name in names)
    for line in text.splitlines():
        assert line.startswith(("# HELP ", "# TYPE ")) or SAMPLE.match(line), line
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert families == sorted(families)


@pytest.mark.parametrize("value, text", [
    (0, "0"), (1, "1"), (1000, "1000"), (123456, "123456"), (1234567, "1.234567e+06"),
    (1e6, "1e+06"), (0.5, "0.5"), (0.0001, "0.0001"), (0.00001, "1e-05"),
    (1712345678.25, "1.71234567825e+09"), (-2.5, "-2.5"), (float("inf"), "+Inf"),
])
def test_numbers_are_printed_as_go_prints_them(value, text):
    assert go_float(value) == text
