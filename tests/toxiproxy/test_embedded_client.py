"""The unmodified toxiproxy-python 0.1.1 client against the embedded server."""

from __future__ import annotations

import socket

import pytest

toxiproxy = pytest.importorskip("toxiproxy")
from toxiproxy.api import APIConsumer  # noqa: E402
from toxiproxy.exceptions import NotFound, ProxyExists  # noqa: E402


@pytest.fixture
def client(server):
    """A ``Toxiproxy`` client aimed at the embedded server; the global target restored after."""
    saved = (APIConsumer.host, APIConsumer.port)
    tox = toxiproxy.Toxiproxy()
    tox.update_api_consumer(server.host, server.port)
    try:
        yield tox
    finally:
        APIConsumer.host, APIConsumer.port = saved


def _port(proxy) -> int:
    return int(proxy.listen.rsplit(":", 1)[1])


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_version_and_running(client):
    assert client.running() is True
    assert client.version() == b'{"version": "2.8.0"}\n'


def test_create_get_list_destroy(client, echo_upstream, connect, tp):
    proxy = client.create(upstream=echo_upstream.address, name="svc")
    assert proxy.name == "svc" and proxy.enabled is True
    assert proxy.upstream == echo_upstream.address
    assert _port(proxy) > 0, "listen must be rewritten to the bound port"

    sock = connect(_port(proxy))
    sock.sendall(b"ping")
    assert tp.recv_exactly(sock, 4) == b"ping"

    assert set(client.proxies()) == {"svc"}
    fetched = client.get_proxy("svc")
    assert (fetched.listen, fetched.upstream) == (proxy.listen, proxy.upstream)
    assert client.get_proxy("nope") is None

    with pytest.raises(ProxyExists):
        client.create(upstream=echo_upstream.address, name="svc")

    assert client.destroy(proxy) is True
    assert client.proxies() == {}
    assert _refused(_port(proxy))
    with pytest.raises(NotFound):
        proxy.destroy()


def test_disable_enable_and_down(client, echo_upstream, connect, tp):
    proxy = client.create(upstream=echo_upstream.address, name="svc")
    port = _port(proxy)
    live = connect(port)
    live.sendall(b"a")
    assert tp.recv_exactly(live, 1) == b"a"

    proxy.disable()
    assert proxy.enabled is False
    assert client.get_proxy("svc").enabled is False
    assert _refused(port)
    assert live.recv(10) == b"", "disabling must close live connections"

    proxy.enable()
    assert client.get_proxy("svc").enabled is True
    sock = connect(port)  # same port again
    sock.sendall(b"b")
    assert tp.recv_exactly(sock, 1) == b"b"

    with proxy.down():
        assert _refused(port)
    assert not _refused(port)


def test_toxics_add_list_destroy(client, echo_upstream):
    proxy = client.create(upstream=echo_upstream.address, name="svc")
    proxy.add_toxic(type="latency", attributes={"latency": 10, "jitter": 1})
    proxy.add_toxic(type="bandwidth", stream="upstream", name="slow", toxicity=0.5,
                    attributes={"rate": 1000})
    toxics = proxy.toxics()
    assert list(toxics) == ["slow", "latency_downstream"], "upstream toxics list first"
    latency = proxy.get_toxic("latency_downstream")
    assert (latency.type, latency.stream, latency.toxicity) == ("latency", "downstream", 1)
    assert latency.attributes == {"latency": 10, "jitter": 1}
    assert toxics["slow"].toxicity == 0.5 and toxics["slow"].attributes == {"rate": 1000}
    assert proxy.get_toxic("missing") is None

    with pytest.raises(ProxyExists):  # the client maps every 409 to ProxyExists
        proxy.add_toxic(type="latency")
    assert proxy.destroy_toxic("latency_downstream") is True
    assert list(proxy.toxics()) == ["slow"]
    with pytest.raises(NotFound):
        proxy.destroy_toxic("latency_downstream")


def test_populate_reset_destroy_all(client, make_upstream):
    first, second = make_upstream(), make_upstream()
    created = client.populate([
        {"name": "a", "upstream": first.address, "listen": "127.0.0.1:0"},
        {"name": "b", "upstream": second.address, "listen": "127.0.0.1:0", "enabled": False},
    ])
    assert sorted(p.name for p in created) == ["a", "b"]
    assert client.get_proxy("b").enabled is False

    client.get_proxy("a").add_toxic(type="timeout", attributes={"timeout": 0})
    assert client.reset() is True
    assert client.get_proxy("a").toxics() == {}
    assert client.get_proxy("b").enabled is True, "reset re-enables every proxy"

    client.destroy_all()
    assert client.proxies() == {}


def test_port_clash_is_a_500(client, echo_upstream, api):
    """The client turns a 500 into KeyError('name'); the server's answer is Toxiproxy's."""
    proxy = client.create(upstream=echo_upstream.address, name="svc")
    with pytest.raises(KeyError):
        client.create(upstream=echo_upstream.address, name="clash", listen=proxy.listen)
    answer = api.post("/proxies", json={"name": "clash", "upstream": echo_upstream.address,
                                        "listen": proxy.listen})
    assert answer.status_code == 500
    assert answer.json() == {
        "error": f"listen tcp {proxy.listen}: bind: address already in use", "status": 500}
    assert "clash" not in client.proxies()
