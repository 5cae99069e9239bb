"""The store host: its listening socket, and rendezvous free of reverse DNS."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))


def listening_families():
    """Where the store's port listens, from the kernel's socket tables."""
    port = int(os.environ["MASTER_PORT"])
    found = []
    for family in ("tcp", "tcp6"):
        with open(f"/proc/net/{family}") as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    found.append((family, local.rsplit(":", 1)[0]))
    dist.init_process_group("gloo")
    dist.destroy_process_group()
    return found


@pytest.mark.ddp(world_size=2)
def test_the_store_listens_on_ipv4_loopback_only(ddp):
    # Clients of a dual-stack socket appear as ::ffff:127.0.0.1, a name hosts files lack.
    res = ddp.run(listening_families)
    res.assert_all_ok()
    assert res.values[0] == [("tcp", "0100007F")]  # 127.0.0.1, and no tcp6 entry


def _namespaces_work() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip") and shutil.which("mount")):
        return False
    probe = subprocess.run(["unshare", "-rnm", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _namespaces_work(),
                    reason="needs unprivileged user, mount and network namespaces (unshare -rnm)")
def test_no_rendezvous_waits_for_reverse_dns_where_dns_drops_queries(tmp_path):
    # A private namespace where DNS never answers and /etc/hosts has no ::ffff:127.0.0.1 line.
    proc = subprocess.run(["unshare", "-rnm", sys.executable, os.path.join(HERE, "_dns_blackhole.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # the machine is as bad as meant: a bare c10d store waits for a reverse query
    assert out["bare_store"] >= 1.5 and "1.0.0.127.in-addr.arpa" in out["bare_queries"], out
    # the harness's runs (plain and through a Toxiproxy proxy) send no query and do not wait
    assert out["queries"] == [], out
    for run in out["runs"]:
        assert run["ok"], out
        assert max(run["init"]) < 1.0, out
    assert out["runs"][1]["seconds"] < 1.5, out  # the first run also waited for the zygote
