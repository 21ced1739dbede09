"""Benchmark: ``ckptool demo`` alone and beside one busy process, with OpenMP workers
as ckptool chooses (sleep when other processes run at start-up, else spin), always
sleeping (``OMP_WAIT_POLICY=PASSIVE``) and always spinning (OpenMP's default).

The busy process is a Python loop pinned to nothing: on a 2-core machine it takes one
core from the demo's two threads; it starts before the demo. "always spinning" runs
the same CLI through ``cli()`` instead of the console script's ``main()``, which makes
the choice. Each case in a fresh process; REPEATS rounds, interleaved; medians of wall
time.

    python scripts/bench_threads.py [--repeats 1]
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

SPINNING = (
    "import sys; from ckptool.cli import cli; sys.argv = ['ckptool', 'demo', sys.argv[1]]; cli()"
)


def timed(argv: list[str], env: dict[str, str], busy: bool) -> float:
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        start = time.perf_counter()
        subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    work = tempfile.mkdtemp(prefix="ckptool-bench-threads-")
    ckptool = [sys.executable, "-m", "ckptool", "demo"]
    cases = {
        "ckptool's choice (sleep if others run)": (ckptool, env),
        "always sleeping": (ckptool, {**env, "OMP_WAIT_POLICY": "PASSIVE"}),
        "always spinning (OpenMP's default)": ([sys.executable, "-c", SPINNING], env),
    }
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.repeats):
        for busy in (False, True):
            for name, (argv, case_env) in cases.items():
                out = os.path.join(work, "demo")
                shutil.rmtree(out, ignore_errors=True)
                times.setdefault((name, busy), []).append(timed([*argv, out], case_env, busy))
    print(f"{os.cpu_count()} CPUs; medians of {args.repeats}")
    print("| workers | alone (s) | beside a busy process (s) | busy / alone |")
    print("| --- | ---: | ---: | ---: |")
    for name in cases:
        alone = statistics.median(times[(name, False)])
        busy = statistics.median(times[(name, True)])
        print(f"| {name} | {alone:.1f} | {busy:.1f} | {busy / alone:.2f}x |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
