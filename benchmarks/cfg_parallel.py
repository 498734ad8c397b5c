"""How much faster is one image with CFG parallelism? Runs cfg-parallelism-sd3.py with 1 process (the baseline: no
parallelism, the whole guidance batch of 2 in one process) and with 2 (a half each), and prints a table: the whole
run as the user waits for it (start-up, imports, loading, generating, saving), the pipeline call alone, the time per
denoising step, the speedups, and how far the 2-process image is from the 1-process one.

    uv run benchmarks/cfg_parallel.py                       # CPU: a random-weight SD3, 1 and 2 processes
    uv run benchmarks/cfg_parallel.py --model stabilityai/stable-diffusion-3.5-medium --size 1024   # 2 GPUs

On the CPU every process gets one thread (OMP_NUM_THREADS=1), so 2 processes use 2 cores. With no --model, a
StableDiffusion3Pipeline with a random-weight transformer big enough that compute, not the all-gather, dominates
(hidden size 768: 4 heads of 192, 8 joint blocks, --layers and --hidden change it) and the tiny text encoders and
VAE (utils/tiny_pipelines.py) is built in a temporary folder; at 512x512 its sequence is 1024 image tokens and
333 prompt tokens (77 CLIP + 256 T5), on a guidance batch of 2.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from utils.tiny_pipelines import build_sd3  # noqa: E402

SCRIPT = ROOT / "cfg-parallelism-sd3.py"


def build_pipeline(out, hidden=768, layers=8):
    """A StableDiffusion3Pipeline whose transformer has random weights and `hidden` = 4 heads x head size; the tiny
    text encoders and VAE, so that the transformer is nearly all of the work."""
    return build_sd3(out, num_layers=layers, attention_head_dim=hidden // 4)


def per_step_seconds(stdout):
    """The script's own figures: `made ... in 12.3 s, 1.50 s per step, ...` -> 1.50."""
    return float(re.search(r" ([\d.]+) s per step", stdout).group(1))


def call_seconds(stdout):
    return float(re.search(r"\) in ([\d.]+) s, ", stdout).group(1))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="SD3 pipeline to run (default: a random-weight SD3 built on the spot)")
    parser.add_argument("--size", type=int, default=512, help="image height and width (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=40,
                        help="denoising steps (default: %(default)s, SD3.5-medium's and the script's own)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each process count, taken in turn; the table shows the best of them, the "
                             "least disturbed by whatever else the machine runs (default: %(default)s)")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="skip the untimed first run that lets Python cache the libraries' bytecode (where a "
                             "run before this one cached it already)")
    parser.add_argument("--hidden", type=int, default=768,
                        help="with no --model: the random transformer's hidden size, 4 heads (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=8,
                        help="with no --model: the random transformer's joint blocks (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: the GPUs where torch can use them, else the CPU; cpu: the CPU on purpose, even "
                             "beside GPUs (the script's --device) (default: %(default)s)")
    args = parser.parse_args()
    args.on_gpu = args.device != "cpu" and torch.accelerator.is_available()
    return args


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="cfg-parallel-") as tmp:
        measure(args, Path(tmp))


def measure(args, work):
    model = args.model or str(build_pipeline(work / "bench-sd3", hidden=args.hidden, layers=args.layers))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # measure what users get: Python caching the libraries' bytecode
    if not args.on_gpu:
        env["OMP_NUM_THREADS"] = "1"  # one core a process: 2 processes use 2 cores
    size = ["--height", str(args.size), "--width", str(args.size)]
    if not args.no_warm_up:  # a first run, not timed: as on a user's machine after their first run, the bytecode
        warm_up = subprocess.run([sys.executable, SCRIPT, "--model", model, *size, "--num-inference-steps", "1",
                                  "--output", work / "warm-up.png", "--device", args.device], env=env,
                                 capture_output=True, text=True)
        if warm_up.returncode != 0:  # is cached
            sys.exit(f"error: the warm-up run failed:\n{warm_up.stderr[-3000:]}")
    best = {}  # processes -> the best (least) of each time over the repeats, and the image
    for n in [n for _ in range(args.repeats) for n in (1, 2)]:  # 1, 2, 1, 2: in turn, not 1, 1, 2, 2
        out = work / f"{n}.png"
        script = [SCRIPT, "--model", model, *size, "--num-inference-steps", str(args.steps), "--output", out,
                  "--device", args.device]
        # One process is a plain run, as the user starts the baseline; 2 are started by torchrun.
        torchrun = [Path(sys.executable).parent / "torchrun", "--nproc-per-node", str(n), "--standalone"]
        command = [sys.executable, *script] if n == 1 else [*torchrun, *script]
        started = time.perf_counter()
        result = subprocess.run([str(a) for a in command], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"error: the run with {n} process(es) failed:\n{result.stderr[-3000:]}")
        with Image.open(out) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        times = (wall, call_seconds(result.stdout), per_step_seconds(result.stdout))
        best[n] = (*map(min, zip(best[n][:3], times)), pixels) if n in best else (*times, pixels)
        print(f"ran {n} process(es): {wall:.1f} s", file=sys.stderr)
    rows = [(n, *best[n]) for n in (1, 2)]

    device = torch.accelerator.current_accelerator() if args.on_gpu else "cpu"
    model = args.model or f"a random-weight SD3 (hidden {args.hidden}, {args.layers} blocks)"
    print(f"\n{args.size}x{args.size}, {args.steps} steps, {model}, on {device}, best of {args.repeats} run(s) each\n")
    print("| processes | whole run (s) | speedup | pipeline call (s) | speedup | per step (s) | speedup | "
          "largest pixel difference from 1 process |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    n0, wall0, call0, step0, pixels0 = rows[0]
    for n, wall, call, step, pixels in rows:
        print(f"| {n} | {wall:.1f} | {wall0 / wall:.2f} | {call:.1f} | {call0 / call:.2f} | {step:.2f} | "
              f"{step0 / step:.2f} | {np.abs(pixels - pixels0).max()} of 255 |")


if __name__ == "__main__":
    main()
