"""What the DDPFAULT_PLAN import hook costs an interpreter that does not use it.

    python bench/bench_hook_startup.py [--rounds N]

Two throwaway virtual environments of this interpreter, without system site-packages, the
same but for one thing: "with" has what installing the package puts into site-packages
(``pytest-ddpfault.pth`` and the ``pytest_ddpfault`` package), "without" has nothing.
``python -c pass`` is started in each, interleaved, ``--rounds`` times, and the start-up
times are compared. A third row shows an interpreter with ``DDPFAULT_PLAN`` set (the hook
arms itself; still no torch import). Last, the .pth line itself is timed in-process with
the variable unset, which is all the hook does then.

The machine is shared and noisy: read the medians, and the difference against its spread.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import venv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTH = os.path.join(REPO, "pytest-ddpfault.pth")


def make_venv(root: str, name: str, with_hook: bool) -> str:
    path = os.path.join(root, name)
    venv.EnvBuilder(system_site_packages=False, with_pip=False, symlinks=True).create(path)
    python = os.path.join(path, "bin", "python")
    site_packages = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    if with_hook:  # what a wheel install puts into site-packages (less the dist-info)
        shutil.copy(PTH, site_packages)
        shutil.copytree(os.path.join(REPO, "pytest_ddpfault"), os.path.join(site_packages, "pytest_ddpfault"),
                        ignore=shutil.ignore_patterns("__pycache__"))
    return python


def start_time(python: str, env: dict) -> float:
    t = time.perf_counter()
    subprocess.run([python, "-c", "pass"], env=env, check=True)
    return time.perf_counter() - t


def describe(times: list[float]) -> str:
    ms = [t * 1000 for t in times]
    q = statistics.quantiles(ms, n=4)
    median, mean = statistics.median(ms), statistics.mean(ms)
    return f"median {median:6.2f} ms  (IQR {q[0]:6.2f}-{q[2]:6.2f}, mean {mean:6.2f})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args(argv)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("DDPFAULT_") and k != "PYTHONPATH"}
    armed_env = {**base_env, "DDPFAULT_PLAN": ""}
    root = tempfile.mkdtemp(prefix="ddpf-bench-")
    try:
        without = make_venv(root, "without", with_hook=False)
        with_hook = make_venv(root, "with", with_hook=True)
        probe = "import sys; print('pytest_ddpfault.rank.env_plan' in sys.modules)"
        check = subprocess.run([with_hook, "-c", probe], env=armed_env, capture_output=True, text=True,
                               check=True)
        assert check.stdout.strip() == "True", "the hook did not run in the 'with' environment"
        rows = {"without the package": (without, base_env),
                "with it, DDPFAULT_PLAN unset": (with_hook, base_env),
                "with it, DDPFAULT_PLAN='' (armed)": (with_hook, armed_env)}
        times: dict[str, list[float]] = {k: [] for k in rows}
        for python, env in rows.values():  # warm the page cache once
            start_time(python, env)
        for _ in range(args.rounds):
            for label, (python, env) in rows.items():
                times[label].append(start_time(python, env))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"python -c pass, {args.rounds} interleaved rounds ({sys.version.split()[0]}):")
    for label, ts in times.items():
        print(f"  {label:<36} {describe(ts)}")
    base = times["without the package"]
    for label in list(times)[1:]:
        paired = [1000 * (t - b) for t, b in zip(times[label], base)]  # same round, back to back
        q = statistics.quantiles(paired, n=4)
        print(f"  {label}: {statistics.median(paired):+7.2f} ms against no package "
              f"(median of per-round differences; IQR {q[0]:+.2f} to {q[2]:+.2f})")
    line = open(PTH).read().strip()
    env_before = os.environ.pop("DDPFAULT_PLAN", None)
    try:
        n = 200_000
        per_call = timeit.timeit(lambda: exec(line, {}), number=n) / n  # noqa: S102 - the .pth line itself
    finally:
        if env_before is not None:
            os.environ["DDPFAULT_PLAN"] = env_before
    print(f"the .pth line alone, variable unset: {per_call * 1e6:.2f} us (exec of: {line})")


if __name__ == "__main__":
    main()
