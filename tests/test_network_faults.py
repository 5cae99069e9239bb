"""Network faults through Toxiproxy: the store proxy, each kind's effect on real gloo
rendezvous, server selection, and the plugin's safe API client."""
import datetime
import os
import stat
import sys
import time

import pytest
import torch
import torch.distributed as dist

from pytest_ddpfault.toxiproxy.client import ToxiproxyAPI, ToxiproxyError, start_server
from pytest_ddpfault.toxiproxy import EmbeddedToxiproxy


def timed_init(timeout=10):
    start = time.monotonic()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    took = time.monotonic() - start
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return {"init": took, "sum": t.item(), "port": int(os.environ["MASTER_PORT"])}


def short_init():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=1))
    dist.destroy_process_group()
    return "init ok"


def store_loop(seconds=4.0):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
    store = dist.distributed_c10d._get_default_store()
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        store.set(f"k{dist.get_rank()}", str(n))
        store.get(f"k{dist.get_rank()}")
        n += 1
    return n


# -- the store proxy -------------------------------------------------------------------

@pytest.mark.ddp(world_size=2, proxy=True)
def test_proxied_run_goes_through_a_proxy_that_is_removed_afterwards(ddp, toxiproxy):
    res = ddp.run(timed_init)
    res.assert_all_ok()
    proxy = ddp.store_proxy
    from toxiproxy.proxy import Proxy
    assert isinstance(proxy, Proxy)
    # MASTER_PORT is the proxy's port, not the store's
    assert {v["port"] for v in res.values} == {int(proxy.listen.rsplit(":", 1)[1])}
    assert proxy.name not in toxiproxy.proxies()


@pytest.mark.ddp(world_size=2, proxy=True)
def test_a_users_own_toxiproxy_client_is_untouched_by_a_proxied_run(ddp, ddpfault_toxiproxy_server):
    # toxiproxy-python keeps its server address in class attributes: a user's client aimed
    # at their own server must still reach it, and nothing of the library is changed.
    from toxiproxy import Toxiproxy
    from toxiproxy.api import APIConsumer
    from toxiproxy.proxy import Proxy

    saved = (APIConsumer.host, APIConsumer.port)
    proxy_methods = dict(vars(Proxy))
    with EmbeddedToxiproxy() as users_server:
        users = Toxiproxy()
        users.update_api_consumer(users_server.host, users_server.port)
        try:
            users.create(upstream="127.0.0.1:9", name="users_own", listen="127.0.0.1:0")
            res = ddp.run(timed_init)
            res.assert_all_ok()
            run_proxy = ddp.store_proxy
            # the user's client still talks to the user's server, and only to it
            assert (APIConsumer.host, APIConsumer.port) == (users_server.host, users_server.port)
            assert set(users.proxies()) == {"users_own"}
            assert set(Toxiproxy().proxies()) == {"users_own"}
            # while the run's Proxy talks to the harness's server
            assert run_proxy.name not in users.proxies()
            harness_api = ddpfault_toxiproxy_server.api
            assert (harness_api.host, harness_api.port) != (users_server.host, users_server.port)
            harness_api.create_proxy(run_proxy.name, "127.0.0.1:9")  # it was removed after the run
            try:
                run_proxy.add_toxic(type="latency", name="lat", attributes={"latency": 5})
                assert set(run_proxy.toxics()) == {"lat"}
                run_proxy.disable()
                assert not harness_api.call("GET", f"/proxies/{run_proxy.name}")["enabled"]
                assert users.get_proxy("users_own").enabled
            finally:
                harness_api.delete_proxy(run_proxy.name)
        finally:
            APIConsumer.host, APIConsumer.port = saved
    assert dict(vars(Proxy)) == proxy_methods
    assert "host" not in vars(Proxy) and "api_consumer" not in vars(Proxy)


@pytest.mark.ddp(world_size=2, proxy=True)
def test_proxy_is_removed_when_the_run_fails(ddp, toxiproxy):
    def boom():
        raise ValueError("user code failed")

    res = ddp.run(boom)
    assert all(r.raised(ValueError) for r in res)
    assert ddp.store_proxy.name not in toxiproxy.proxies()


def test_unproxied_run_has_no_proxy(ddp):
    ddp.run(lambda: None).assert_all_ok()
    assert ddp.store_proxy is None


# -- each kind on real rendezvous ------------------------------------------------------

@pytest.mark.ddp(world_size=2, fault="block_port", timeout=20)
def test_block_port_makes_init_raise_a_network_error(ddp):
    res = ddp.run(short_init)
    res.assert_survivors_raised(dist.DistNetworkError, match="timed out|refused|connect")
    assert [e.kind for e in res.fault_events] == ["block_port"]
    assert res.fault_events[0].trigger == "init"


@pytest.mark.ddp(world_size=2, fault="block_port(duration=1)", timeout=20)
def test_block_port_with_duration_recovers_through_store_reconnects(ddp):
    res = ddp.run(timed_init)
    res.assert_all_ok()
    assert min(v["init"] for v in res.values) >= 0.9      # blocked for the first second
    assert [e.detail for e in res.fault_events][-1] == "removed"


@pytest.mark.ddp(world_size=2, timeout=30)
def test_latency_slows_init_by_at_least_the_latency(ddp):
    base = ddp.run(timed_init, faults=None)
    slow = ddp.run(timed_init, faults="latency(latency=400)")
    base.assert_all_ok()
    slow.assert_all_ok()
    added = min(v["init"] for v in slow.values) - max(v["init"] for v in base.values)
    assert added >= 0.4, (base.values, slow.values)


@pytest.mark.ddp(world_size=2, fault="blackhole(at=t=0.5)", timeout=4)
def test_blackhole_after_init_stalls_store_operations(ddp):
    res = ddp.run(store_loop, seconds=10.0)
    # data vanishes but connections stay open: store calls block, nothing raises,
    # until the harness deadline ends the ranks and shows where they were
    assert {r.status for r in res} == {"hung"}
    assert all("store_loop" in (r.stack or "") for r in res)
    assert res.fault_events[0].time == pytest.approx(0.5, abs=0.3)


@pytest.mark.ddp(world_size=2, fault="reset_peer(timeout=0)", timeout=20)
def test_reset_peer_breaks_the_rendezvous(ddp):
    res = ddp.run(short_init)
    res.assert_survivors_raised(dist.DistError)


@pytest.mark.ddp(world_size=2, fault="limit_data(bytes=64)", timeout=20)
def test_limit_data_closes_the_store_connection(ddp):
    res = ddp.run(short_init)
    res.assert_survivors_raised(dist.DistError)


@pytest.mark.ddp(world_size=2, fault="bandwidth(rate=0, at=t=0.5)", timeout=4)
def test_bandwidth_zero_stalls_the_store(ddp):
    res = ddp.run(store_loop, seconds=10.0)
    assert {r.status for r in res} == {"hung"}


# -- server selection and the API client ------------------------------------------------

def test_toxiproxy_fixture_is_a_working_client(toxiproxy):
    assert toxiproxy.running()
    assert b"2." in toxiproxy.version()


def test_an_explicit_url_is_used_as_is():
    with EmbeddedToxiproxy() as other:
        server = start_server(other.url)
        assert server.kind == "external" and server.url == other.url
        assert server.api.version().startswith("2.")
        server.stop()  # not ours: stays up
        assert ToxiproxyAPI(other.url).version()


def test_toxiproxy_server_on_path_is_started_on_loopback(tmp_path, monkeypatch):
    # a stand-in for the real binary, taking its flags (-host, -port)
    fake = tmp_path / "toxiproxy-server"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -m pytest_ddpfault.toxiproxy.cli \"$@\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    server = start_server(None)
    try:
        assert server.kind.startswith("toxiproxy-server")
        assert server.url.startswith("http://127.0.0.1:")
        assert server.api.version().startswith("2.")
    finally:
        server.stop()
    with pytest.raises(ToxiproxyError):
        server.api.version()


def test_api_errors_say_what_was_asked_and_what_came_back():
    with EmbeddedToxiproxy() as srv:
        api = ToxiproxyAPI(srv.url)
        api.create_proxy("p", "127.0.0.1:9")
        with pytest.raises(ToxiproxyError, match=r"POST /proxies -> 409: .*already exists"):
            api.create_proxy("p", "127.0.0.1:9")
        with pytest.raises(ToxiproxyError, match=r"404"):
            api.delete_proxy("missing")
    with pytest.raises(ToxiproxyError, match="failed"):
        ToxiproxyAPI(srv.url, timeout=2).version()   # nothing listens there any more
    with pytest.raises(ToxiproxyError, match="expected http://HOST:PORT"):
        ToxiproxyAPI("http://nohostport")


def test_bad_toxiproxy_url_fails_the_session_clearly(pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.ddp(world_size=2, fault="latency(latency=10)")
        def test_x(ddp):
            ddp.run(lambda: 1)
        """
    )
    with EmbeddedToxiproxy() as srv:
        dead_url = srv.url
    result = pytester.runpytest("--toxiproxy-url", dead_url)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*ToxiproxyError*GET /version failed*"])
