"""Groups or not? Many images on N processes, two ways: N data-parallel processes, each making its own images, or
N/2 groups of 2 (--context-parallel 2), the two of a group making each image together. Runs
data-parallelism-accelerate.py both ways on the same prompts, one after the other, and prints a table: the time to
the first image and to the last one, from the launch (start-up, imports and loading included, which both pay
alike), and the time one image takes (the median of the script's own figure, in metadata.jsonl).

    uv run benchmarks/groups.py                  # CPU: 8 prompts, a random-weight FLUX at 512x512, 2 processes
    uv run benchmarks/groups.py --processes 8 --model black-forest-labs/FLUX.1-dev --size 1024 --steps 28

On the CPU every process gets one thread (OMP_NUM_THREADS=1), so N processes use N cores. With no --model, the
FLUX.1 pipeline of benchmarks/context_parallel.py is built in a temporary folder: a random-weight transformer big
enough that compute, not the exchanges, dominates (hidden size 768: 12 heads of 64, 2 + 4 blocks, 81 M parameters;
--hidden changes it), and the tiny text encoders and VAE; at 512x512 its sequence is 1024 image + 512 prompt tokens.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from context_parallel import build_pipeline  # noqa: E402

SCRIPT = ROOT / "data-parallelism-accelerate.py"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: the GPUs where torch can use them, else the CPU; cpu: the CPU on purpose, even "
                             "beside GPUs (the script's --device) (default: %(default)s)")
    parser.add_argument("--processes", type=int,
                        help="processes, a multiple of 2 (default: every GPU, at least 2; 2 on the CPU)")
    parser.add_argument("--model", help="pipeline to run (default: a random-weight FLUX built on the spot)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts, an image each (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="image height and width (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each layout, taken in turn; the table shows the best of each figure "
                             "(default: %(default)s)")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="skip the untimed first run that lets Python cache the libraries' bytecode")
    parser.add_argument("--hidden", type=int, default=768,
                        help="with no --model: the random transformer's hidden size, in heads of 64 (default: "
                             "%(default)s)")
    args = parser.parse_args()
    args.on_gpu = args.device != "cpu" and torch.accelerator.is_available()
    if args.on_gpu and not args.processes and torch.accelerator.device_count() < 2:
        parser.error("a group of 2 needs 2 GPUs, and this machine has 1: run it on the CPU (--device cpu)")
    args.processes = args.processes or (torch.accelerator.device_count() // 2 * 2 if args.on_gpu else 2)
    return args


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="groups-") as tmp:
        measure(args, Path(tmp))


def measure(args, work):
    model = args.model or str(build_pipeline(work / "bench-flux", hidden=args.hidden, heads=args.hidden // 64))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # measure what users get: Python caching the libraries' bytecode
    if not args.on_gpu:
        env["OMP_NUM_THREADS"] = "1"  # one core a process: N processes use N cores
    base = ["--model", model, "--height", str(args.size), "--width", str(args.size), "--num-inference-steps",
            str(args.steps), "--device", args.device]
    common = [*base, *[a for i in range(args.prompts) for a in ("--prompt", f"prompt number {i}")]]
    if not args.no_warm_up:  # as on a user's machine after their first run: the bytecode is cached
        warm_up = subprocess.run([sys.executable, SCRIPT, *base, "--num-inference-steps", "1", "--prompt", "warm-up",
                                  "--output-dir", work / "warm-up"], env=env, capture_output=True, text=True)
        if warm_up.returncode != 0:
            sys.exit(f"error: the warm-up run failed:\n{warm_up.stderr[-3000:]}")
    layouts = {f"{args.processes} data-parallel processes": [],
               f"{args.processes // 2} group{'s' * (args.processes > 2)} of 2, --context-parallel 2":
                   ["--context-parallel", "2"]}
    best = {}
    for n, (name, flags) in enumerate([layout for _ in range(args.repeats) for layout in layouts.items()]):
        figures = run(args, env, common + flags, work / f"run-{n}")
        best[name] = tuple(map(min, zip(best[name], figures))) if name in best else figures
        print(f"{name}: first image {figures[0]:.1f} s, all {figures[1]:.1f} s", file=sys.stderr, flush=True)
    device = torch.accelerator.current_accelerator() if args.on_gpu else "cpu"
    print(f"\n{args.prompts} prompts, {args.size}x{args.size}, {args.steps} steps, "
          f"{args.model or f'a random-weight FLUX (hidden {args.hidden})'}, on {device}, best of {args.repeats} "
          "run(s) each\n")
    print("| layout | first image (s) | vs data parallel | all images (s) | vs data parallel | one image (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    first0, all0, _ = best[next(iter(layouts))]
    for name, (first, all_, one) in best.items():
        print(f"| {name} | {first:.1f} | {first0 / first:.2f}x sooner | {all_:.1f} | "
              f"{all0 / all_:.2f}x as fast | {one:.2f} |")


def run(args, env, script_args, out):
    """One launch: the seconds from the launch to the first image on disk and to the end, and the median seconds
    one image took (the script's own figure)."""
    launch = [Path(sys.executable).parent / "torchrun", "--nproc-per-node", str(args.processes), "--standalone"]
    log_file = out.with_suffix(".log")
    with open(log_file, "w") as log:
        started = time.perf_counter()
        job = subprocess.Popen([str(a) for a in [*launch, SCRIPT, *script_args, "--output-dir", out]], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
        first = None
        while job.poll() is None:
            if first is None and any(out.glob("[0-9]*-*.png")):
                first = time.perf_counter() - started
            time.sleep(0.02)
        total = time.perf_counter() - started
    log = log_file.read_text()
    if job.returncode != 0:
        sys.exit(f"error: the run {' '.join(map(str, script_args[-2:]))} failed:\n{log[-3000:]}")
    seconds = [json.loads(line)["seconds"] for line in (out / "metadata.jsonl").read_text().splitlines()]
    return first or total, total, statistics.median(seconds)


if __name__ == "__main__":
    main()
