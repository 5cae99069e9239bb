"""Benchmark the network engines (``--ddp-network``): what a node namespace costs a run.

    python bench/bench_netns.py [--repeats 5] [--steps 30]

A 4-rank, 2-node DDP training run (bench_data_plane.train), alternated so that the
machine's noise hits both alike; medians and ratios are printed:

1. no fault: ``proxies`` (nothing proxied: gloo straight from rank to rank) against
   ``namespaces`` (a namespace per node, veths between them), whole run (wall) and loop;
2. a partition waiting to come (``partition(nodes=(1,), at=step#100000)``) on each engine:
   the proxies route every crossing link through Toxiproxy, the namespaces only add routes
   when it comes.

Bounded run time: about a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_data_plane import timed, train  # noqa: E402


PARSER = argparse.ArgumentParser(description=__doc__.splitlines()[0])
PARSER.add_argument("--repeats", type=int, default=5)
PARSER.add_argument("--steps", type=int, default=30)


def main(argv: list[str] | None = None) -> int:
    args = PARSER.parse_args(argv)
    timed(train, 2, world_size=4, nodes=2, timeout=120)  # the zygote's start is no one's cost
    waiting = "partition(nodes=(1,), at=step#100000)"
    cases = [(f"{label} {engine}", engine, faults) for label, faults in (("no fault", None), ("waiting", waiting))
             for engine in ("proxies", "namespaces")]
    wall: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    loop: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(args.repeats):
        for name, engine, faults in cases:
            took, res = timed(train, args.steps, world_size=4, nodes=2, faults=faults, timeout=120, network=engine)
            assert res.network == engine, res.network
            wall[name].append(took)
            loop[name].append(max(res.values))

    def row(label, base, other):
        b, o = statistics.median(base), statistics.median(other)
        print(f"{label:<52}{b:>10.3f}{o:>10.3f}{o / b:>8.2f}")

    print(f"{'median seconds':<52}{'proxies':>10}{'netns':>10}{'ratio':>8}")
    for label in ("no fault", "waiting"):
        row(f"4 ranks, 2 nodes, {label}: the whole run (wall)", wall[f"{label} proxies"], wall[f"{label} namespaces"])
        row(f"4 ranks, 2 nodes, {label}: {args.steps} DDP steps (loop)", loop[f"{label} proxies"],
            loop[f"{label} namespaces"])
    print(f"({args.repeats} repeats each, alternated; {os.cpu_count()} CPUs; waiting: {waiting})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
