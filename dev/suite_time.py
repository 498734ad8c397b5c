"""How long does the test suite take, in a figure that does not depend on the machine's speed, and where does the
time go?

Times two things on this machine, one after the other: one plain run of data-parallelism-accelerate.py on the tiny
SD3 pipeline (one prompt, one step, 64x64, on the CPU: mostly start-up, imports and loading, like most runs in the
tests), and the whole test suite as the README runs it (`uv run pytest`, here `python -m pytest` in the same
environment). It prints both, their ratio (the suite's time in units of one run of the script: the goal is 100 or
less; a faster or slower machine moves both times alike), and the slowest tests (pytest's --durations).

    uv run dev/suite_time.py                    # the whole suite
    uv run dev/suite_time.py -- -k readme       # arguments after -- go to pytest
    uv run dev/suite_time.py --log suite.log    # and pytest's whole output

Bytecode is cached first (an untimed run of the script), as on a user's machine after the first run.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL = 100  # units of one run of the script


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5,
                        help="timed runs of the script; the median is the unit (default: %(default)s)")
    parser.add_argument("--log", type=Path, help="write pytest's whole output to this file")
    parser.add_argument("--slowest", type=int, default=15, help="how many of the slowest tests to show (default: "
                                                                 "%(default)s)")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest, after -- (default: none)")
    return parser.parse_args()


def main():
    args = parse_args()
    sys.path.insert(0, str(ROOT))
    from utils.tiny_pipelines import build_sd3  # here, not at the top: --help answers at once

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # measure what users get: Python caching the libraries' bytecode
    with tempfile.TemporaryDirectory(prefix="suite-time-") as tmp:
        model = build_sd3(Path(tmp) / "sd3")
        command = [sys.executable, ROOT / "data-parallelism-accelerate.py", "--model", model, "--prompt", "a red fox",
                   "--num-inference-steps", "1", "--height", "64", "--width", "64", "--device", "cpu"]
        times = []
        for run in range(args.runs + 1):  # the first caches the bytecode, and is not timed
            out = Path(tmp) / f"out-{run}"
            started = time.perf_counter()
            result = subprocess.run([str(a) for a in [*command, "--output-dir", out]], env=env, capture_output=True,
                                    text=True)
            if result.returncode != 0:
                sys.exit(f"error: the script failed:\n{result.stderr[-3000:]}")
            if run:
                times.append(time.perf_counter() - started)
    unit = sorted(times)[len(times) // 2]
    print(f"one run of the script: {unit:.1f} s (median of {', '.join(f'{t:.1f}' for t in times)})", flush=True)

    started = time.perf_counter()
    suite = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            f"--durations={args.slowest}", *args.pytest_args],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if args.log:
        args.log.write_text(suite.stdout + suite.stderr, encoding="utf-8")
    summary = [line for line in suite.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    outcome = summary[-1].strip("= ") if summary else "no summary"
    print(f"the suite: {seconds:.1f} s ({outcome}), exit {suite.returncode}")
    print(f"ratio: {seconds / unit:.1f} (suite / one run of the script; the goal is {GOAL} or less)")
    slowest = re.findall(r"^\s*([\d.]+)s (call|setup|teardown)\s+(\S+)", suite.stdout, flags=re.M)
    if slowest:
        print(f"the {len(slowest)} slowest (seconds, in units):")
        for taken, _, test in slowest:
            print(f"  {float(taken):6.1f} s {float(taken) / unit:5.1f}  {test}")
    if suite.returncode != 0:
        print(suite.stdout[-5000:], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
