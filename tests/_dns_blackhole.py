"""Run inside ``unshare -rnm`` (a private user, mount and network namespace) by
test_store_host.py: a machine whose DNS drops every query and whose hosts file lists
127.0.0.1 only, as most do. Prints one JSON line: what a bare c10d store costs there,
what ddpfault runs cost, and which DNS queries were sent."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

RESOLVER_TIMEOUT = 2  # seconds per try; one try


def blackhole(sock: socket.socket, seen: list) -> None:
    while True:
        data, _ = sock.recvfrom(4096)
        i, labels = 12, []
        while i < len(data) and data[i]:
            labels.append(data[i + 1:i + 1 + data[i]].decode(errors="replace"))
            i += 1 + data[i]
        seen.append(".".join(labels))


def isolate(here: str) -> None:
    """``here``: the test's own temporary directory (pytest removes it), for the files bound
    over /etc/resolv.conf and /etc/hosts in this mount namespace."""
    files = {"/etc/resolv.conf": f"nameserver 127.0.0.1\noptions timeout:{RESOLVER_TIMEOUT} attempts:1\n",
             "/etc/hosts": f"127.0.0.1 localhost\n127.0.0.1 {socket.gethostname()}\n"}
    for target, text in files.items():
        path = os.path.join(here, os.path.basename(target))
        with open(path, "w") as f:
            f.write(text)
        subprocess.run(["mount", "--bind", path, target], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


BARE_STORE = """
import time, datetime
from torch.distributed import TCPStore
t = time.monotonic()
TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=datetime.timedelta(seconds=30))
print(time.monotonic() - t)
"""


def timed_init():
    import time

    import torch
    import torch.distributed as dist
    t = time.monotonic()
    dist.init_process_group("gloo")
    took = time.monotonic() - t
    x = torch.ones(1)
    dist.all_reduce(x)
    dist.destroy_process_group()
    return took


def main() -> None:
    isolate(sys.argv[1])
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind(("127.0.0.1", 53))
    seen: list = []
    threading.Thread(target=blackhole, args=(dns, seen), daemon=True).start()
    bare = float(subprocess.run([sys.executable, "-c", BARE_STORE], capture_output=True, text=True,
                                timeout=60, check=True).stdout.split()[-1])
    bare_queries = list(seen)
    seen.clear()
    from pytest_ddpfault import run_group

    runs = []
    for faults in (None, None, "latency(latency=1)"):  # the last one through a Toxiproxy proxy
        t = time.monotonic()
        res = run_group(timed_init, world_size=2, faults=faults, timeout=60)
        runs.append({"ok": res.ok, "seconds": time.monotonic() - t, "init": res.values})
    print(json.dumps({"bare_store": bare, "bare_queries": bare_queries, "runs": runs, "queries": seen}))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
