"""HTTP API semantics beyond the transcript: proxies, toxics, bad requests, HTTP details."""

from __future__ import annotations

import json
import re
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TEXT = "text/plain; charset=utf-8"


def _listen_port(proxy_json: dict) -> int:
    return int(proxy_json["listen"].rsplit(":", 1)[1])


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _assert_alive(api) -> None:
    answer = api.get("/version")
    assert answer.status_code == 200 and answer.json() == {"version": "2.8.0"}


# --- proxies -----------------------------------------------------------------------------


def test_disable_closes_listener_and_live_connections(api, echo_proxy, connect, tp):
    live = connect(echo_proxy)
    live.sendall(b"x")
    assert tp.recv_exactly(live, 1) == b"x"
    answer = api.patch("/proxies/echo", json={"enabled": False})
    assert answer.status_code == 200 and answer.json()["enabled"] is False
    assert live.recv(1) == b""
    assert _refused(echo_proxy)
    answer = api.post("/proxies/echo", json={"enabled": True})  # POST works like PATCH
    assert _listen_port(answer.json()) == echo_proxy, "re-enabled on the same port"
    again = connect(echo_proxy)
    again.sendall(b"y")
    assert tp.recv_exactly(again, 1) == b"y"


def test_update_upstream_restarts_and_drops_connections(api, echo_proxy, make_upstream, connect, tp):
    live = connect(echo_proxy)
    live.sendall(b"x")
    assert tp.recv_exactly(live, 1) == b"x"
    other = make_upstream(lambda conn, up: conn.sendall(b"other"))
    answer = api.patch("/proxies/echo", json={"upstream": other.address})
    assert answer.status_code == 200
    assert answer.json()["upstream"] == other.address and answer.json()["enabled"] is True
    assert live.recv(1) == b""
    assert tp.recv_until_eof(connect(_listen_port(answer.json()))) == b"other"


def test_update_listen_moves_the_proxy(api, echo_proxy, connect, tp):
    answer = api.patch("/proxies/echo", json={"listen": "127.0.0.1:0"})
    port = _listen_port(answer.json())
    assert port not in (0, echo_proxy)
    assert _refused(echo_proxy)
    sock = connect(port)
    sock.sendall(b"z")
    assert tp.recv_exactly(sock, 1) == b"z"


def test_create_disabled_then_enable(api, echo_upstream, connect, tp):
    answer = api.post("/proxies", json={"name": "off", "upstream": echo_upstream.address,
                                        "listen": "127.0.0.1:0", "enabled": False})
    assert answer.status_code == 201 and answer.json()["enabled"] is False
    port = _listen_port(api.patch("/proxies/off", json={"enabled": True}).json())
    sock = connect(port)
    sock.sendall(b"on")
    assert tp.recv_exactly(sock, 2) == b"on"


def test_delete_proxy_closes_everything(api, echo_proxy, connect):
    live = connect(echo_proxy)
    assert api.delete("/proxies/echo").status_code == 204
    assert live.recv(1) == b""
    assert _refused(echo_proxy)
    assert api.get("/proxies/echo").status_code == 404
    assert api.delete("/proxies/echo").status_code == 404


def test_unreachable_upstream_closes_client(api, connect):
    with socket.socket() as holder:  # a bound, non-listening port: connections are refused
        holder.bind(("127.0.0.1", 0))
        port = api.create_proxy("dead", f"127.0.0.1:{holder.getsockname()[1]}")
        sock = connect(port)
        assert sock.recv(1) == b""


def test_populate_keeps_unchanged_proxies(api, echo_upstream, make_upstream):
    port = api.create_proxy("keep", echo_upstream.address)
    api.add_toxic("keep", "latency", attributes={"latency": 5})
    listen = f"127.0.0.1:{port}"
    other = make_upstream()
    answer = api.post("/populate", json=[
        {"name": "keep", "upstream": echo_upstream.address, "listen": listen},
        {"name": "new", "upstream": other.address, "listen": "127.0.0.1:0", "enabled": False},
    ])
    assert answer.status_code == 201
    kept, new = answer.json()["proxies"]
    assert kept["listen"] == listen and [t["name"] for t in kept["toxics"]] == ["latency_downstream"]
    assert new["enabled"] is False
    assert api.post("/populate", json=[]).json() == {"proxies": None}


def test_populate_error_reports_proxies_created_so_far(api, echo_upstream):
    port = api.create_proxy("holder", echo_upstream.address)
    answer = api.post("/populate", json=[
        {"name": "first", "upstream": echo_upstream.address, "listen": "127.0.0.1:0"},
        {"name": "clash", "upstream": echo_upstream.address, "listen": f"127.0.0.1:{port}"},
    ])
    assert answer.status_code == 500
    assert answer.headers["Content-Type"] == "application/json"
    body = answer.json()
    assert "address already in use" in body["error"] and body["status"] == 500
    assert [p["name"] for p in body["proxies"]] == ["first"]


def test_reset_restores_proxies_and_closes_held_connections(api, echo_upstream, echo_proxy,
                                                           connect, tp):
    api.add_toxic("echo", "timeout", attributes={"timeout": 0})
    held = connect(echo_proxy)
    held.sendall(b"x")
    tp.wait_for(lambda: echo_upstream.received == b"x", what="x at the upstream")
    other_port = api.create_proxy("other", echo_upstream.address, enabled=False)
    assert api.post("/reset").status_code == 204
    assert held.recv(1) == b"", "removing the timeout toxic closes what it held"
    proxies = api.get("/proxies").json()
    assert proxies["echo"]["toxics"] == []
    assert proxies["other"]["enabled"] is True
    assert not _refused(_listen_port(proxies["other"])) and other_port == 0


# --- toxics ------------------------------------------------------------------------------


def test_toxic_defaults_names_and_order(api, echo_proxy):
    down = api.add_toxic("echo", "latency")
    assert down == {"attributes": {"latency": 0, "jitter": 0}, "name": "latency_downstream",
                    "type": "latency", "stream": "downstream", "toxicity": 1}
    api.add_toxic("echo", "latency", stream="upstream")
    api.add_toxic("echo", "slow_close", name="sc", stream="upstream")
    names = [t["name"] for t in api.get("/proxies/echo/toxics").json()]
    assert names == ["latency_upstream", "sc", "latency_downstream"]
    # names are unique across both streams
    answer = api.post("/proxies/echo/toxics", json={"type": "timeout", "name": "sc"})
    assert (answer.status_code, answer.json()["error"]) == (409, "toxic already exists")
    assert api.get("/proxies/echo/toxics/sc").json()["stream"] == "upstream"
    assert api.get("/proxies/echo/toxics/nope").status_code == 404


def test_every_toxic_type_and_its_attributes(api, echo_proxy):
    expected = {
        "latency": {"latency": 0, "jitter": 0},
        "bandwidth": {"rate": 0},
        "slow_close": {"delay": 0},
        "timeout": {"timeout": 0},
        "reset_peer": {"timeout": 0},
        "slicer": {"average_size": 0, "size_variation": 0, "delay": 0},
        "limit_data": {"bytes": 0},
    }
    for kind, attributes in expected.items():
        assert api.add_toxic("echo", kind, toxicity=0)["attributes"] == attributes


def test_toxic_update_merges_attributes(api, echo_proxy):
    api.add_toxic("echo", "slicer", name="cut",
                  attributes={"average_size": 16, "size_variation": 4, "delay": 100})
    answer = api.patch("/proxies/echo/toxics/cut",
                       json={"attributes": {"delay": 5, "bogus": 1}, "name": "renamed",
                             "stream": "upstream", "type": "latency"})
    assert answer.status_code == 200
    assert answer.json() == {"attributes": {"average_size": 16, "size_variation": 4, "delay": 5},
                             "name": "cut", "type": "slicer", "stream": "downstream",
                             "toxicity": 1}
    answer = api.patch("/proxies/echo/toxics/cut", json={"toxicity": 0.25})
    assert answer.json()["toxicity"] == 0.25 and answer.json()["attributes"]["delay"] == 5
    bad = api.patch("/proxies/echo/toxics/cut", json={"attributes": {"delay": "x"}})
    assert bad.status_code == 400
    assert api.get("/proxies/echo/toxics/cut").json()["attributes"]["delay"] == 5, "all or nothing"


@pytest.mark.parametrize("body, message", [
    ({"type": "latency", "attributes": {"latency": "slow"}},
     "bad request body: json: cannot unmarshal string into Go struct field "
     "LatencyToxic.attributes.latency of type int64"),
    ({"type": "latency", "attributes": {"latency": 1.5}}, "bad request body: "),
    ({"type": "latency", "attributes": {"latency": True}}, "bad request body: "),
    ({"type": "latency", "attributes": [1]}, "bad request body: "),
    ({"type": "latency", "toxicity": "high"}, "bad request body: "),
    ({"type": "latency", "stream": "sideways"},
     "stream was invalid, can be either upstream or downstream"),
    ({"type": "nope"}, "invalid toxic type"),
    ({}, "invalid toxic type"),
    ({"type": 5}, "bad request body: "),
])
def test_bad_toxic_bodies_are_400(api, echo_proxy, body, message):
    answer = api.post("/proxies/echo/toxics", json=body)
    assert answer.status_code == 400
    assert answer.headers["Content-Type"] == TEXT
    assert answer.json()["error"].startswith(message) and answer.json()["status"] == 400
    assert answer.text.endswith("}\n")
    assert api.get("/proxies/echo/toxics").json() == []


def test_stream_names_are_case_insensitive_but_kept(api, echo_proxy):
    toxic = api.add_toxic("echo", "latency", stream="UpStream")
    assert (toxic["name"], toxic["stream"]) == ("latency_UpStream", "UpStream")
    assert api.get("/proxies/echo/toxics").json()[0]["stream"] == "UpStream"


# --- bad requests and HTTP details -------------------------------------------------------


@pytest.mark.parametrize("path, data", [
    ("/proxies", b"{not json"),
    ("/proxies", b""),
    ("/proxies", b'"just a string"'),
    ("/proxies", b'{"name": 5, "upstream": "x:1"}'),
    ("/proxies", b'{"name": "n", "upstream": "x:1", "enabled": "yes"}'),
    ("/proxies", b'{"name": "n", "upstream": NaN}'),
    ("/proxies", b"[" * 100_000),
    ("/proxies", "\udcff".encode("utf-8", "surrogatepass")),
    ("/populate", b'{"name": "x"}'),
    ("/populate", b"[1, 2]"),
    ("/proxies/echo", b"[]"),
    ("/proxies/echo/toxics", b"\x00\x01\x02"),
    ("/proxies/echo/toxics/none", b"{}"),
])
def test_garbage_gets_toxiproxy_errors(api, echo_proxy, path, data):
    answer = api.post(path, data=data)
    assert 400 <= answer.status_code < 500, answer.text
    body = answer.json()
    assert set(body) >= {"error", "status"} and body["status"] == answer.status_code
    _assert_alive(api)


def test_huge_body_is_refused_and_server_survives(api):
    answer = api.post("/proxies", data=b" " * (17 << 20))
    assert answer.status_code == 400
    assert answer.json() == {"error": "bad request body: http: request body too large",
                             "status": 400}
    _assert_alive(api)


def test_missing_fields(api):
    answer = api.post("/proxies", json={"name": "x"})
    assert answer.json() == {"error": "missing required field: upstream", "status": 400}
    answer = api.post("/populate", json=[{"name": "a", "upstream": "127.0.0.1:1"}, {"upstream": "u:1"}])
    assert answer.status_code == 400
    assert answer.json() == {"error": "missing required field: name at proxy 2", "status": 400,
                             "proxies": None}
    assert api.get("/proxies").json() == {}, "populate validates everything first"


def test_bad_listen_address_is_500(api):
    answer = api.post("/proxies", json={"name": "x", "upstream": "127.0.0.1:1", "listen": "nowhere"})
    assert answer.status_code == 500
    assert answer.json()["error"] == "listen tcp: address nowhere: missing port in address"


def test_routes_methods_and_browsers(api):
    missing = api.get("/nope")
    assert (missing.status_code, missing.text, missing.headers["Content-Type"]) == (
        404, "404 page not found\n", TEXT)
    assert api.get("/proxies/").status_code == 404
    wrong = api.request("PUT", "/proxies")
    assert (wrong.status_code, wrong.text, wrong.headers.get("Content-Type")) == (405, "", None)
    assert api.request("DELETE", "/version").status_code == 405
    browser = api.get("/version", headers={"User-Agent": "Mozilla/5.0 (X11)"})
    assert (browser.status_code, browser.text) == (403, "User agent not allowed\n")


def test_keep_alive_pipelined_and_chunked(server):
    """Two requests on one connection (one of them chunked), answered in order."""
    requests_bytes = (
        b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /proxies HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\n{\"nam\r\n0\r\n\r\n"
        b"GET /proxies HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(requests_bytes)
        data = b""
        while True:
            more = sock.recv(65536)
            if not more:
                break
            data += more
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
    assert statuses == [b"200", b"400", b"200"]
    assert data.endswith(b"\r\n\r\n{}")


def test_malformed_http_is_answered_and_closed(server, api):
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 400 ")
        assert sock.recv(1024) == b""
    _assert_alive(api)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["name", "type", "stream", "toxicity", "attributes",
                                       "latency", "rate", "upstream", "enabled",
                                       "bytes", "x"]), children, max_size=5),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/proxies", "/proxies/echo", "/proxies/echo/toxics", "/populate",
                             "/proxies/echo/toxics/t"]),
       body=_json)
def test_fuzzed_bodies_never_break_the_server(api, echo_upstream, path, body):
    """Any JSON body gets an answer (never a 5xx other than a failed listen) and the server lives.

    ("listen" is left out of the keys: every server in these tests binds 127.0.0.1.)
    """
    if api.get("/proxies/echo").status_code == 404:
        api.create_proxy("echo", echo_upstream.address)
    api.post("/proxies/echo/toxics", json={"type": "noop", "name": "t"})
    answer = api.post(path, data=json.dumps(body))
    assert answer.status_code < 500 or "listen tcp" in answer.json()["error"], answer.text
    _assert_alive(api)
    api.post("/reset")
    for name in api.get("/proxies").json():
        if name != "echo":
            api.delete(f"/proxies/{name}")
