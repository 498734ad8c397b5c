"""How well does data parallelism scale here? Runs data-parallelism-accelerate.py with 1..N processes and
prints a table: processes, wall time, images/s and efficiency = throughput(N) / (N x throughput(1)).

Two times are measured for each run: the whole run, as a user waits for it (start-up, imports, loading the
pipeline in every process, generating, saving), and generation alone (the slowest rank's time between its
first and its last image, from the script's own summary.json).

    uv run benchmarks/scaling.py                       # CPU: a compute-bound tiny pipeline, 1 and 2 processes
    uv run benchmarks/scaling.py --processes 1 2 4 --model stabilityai/stable-diffusion-3.5-medium --size 1024

On the CPU every process gets one thread (OMP_NUM_THREADS=1), so N processes use N cores; with no --model a
tiny random-weight SD3 pipeline (8 transformer layers, 18 M parameters) is built in a temporary folder.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: the GPUs where torch can use them, else the CPU; cpu: the CPU on purpose, even "
                             "beside GPUs (the script's --device) (default: %(default)s)")
    parser.add_argument("--processes", type=int, nargs="+",
                        help="process counts to run (default: 1 and every device, or 1 and 2 on the CPU)")
    parser.add_argument("--model", help="pipeline to run (default: a compute-bound tiny SD3 built on the spot)")
    parser.add_argument("--prompts", type=int, default=48, help="number of prompts (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="image height and width (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (default: %(default)s)")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="skip the untimed first run that lets Python cache the libraries' bytecode (where a "
                             "run before this one cached it already)")
    parser.add_argument("--launcher", choices=["torchrun", "accelerate"], default="accelerate",
                        help="how to start the processes (default: %(default)s)")
    args = parser.parse_args()
    args.on_gpu = args.device != "cpu" and torch.accelerator.is_available()
    devices = torch.accelerator.device_count() if args.on_gpu else min(os.cpu_count(), 2)
    args.processes = args.processes or sorted({1, devices})
    return args


def launch(launcher, n, script_args):
    bin_dir = Path(sys.executable).parent
    if launcher == "torchrun":
        return [bin_dir / "torchrun", "--nproc-per-node", str(n), "--standalone", *script_args]
    multi = ["--multi_gpu"] if n > 1 else []
    return [bin_dir / "accelerate", "launch", *multi, "--num_processes", str(n), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *script_args]


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        measure(args, Path(tmp))


def measure(args, work):
    model = args.model
    if not model:  # diffusers and transformers imported only for this: the runs import them in their own processes
        sys.path.insert(0, str(ROOT))
        from utils.tiny_pipelines import build_sd3
        model = str(build_sd3(work / "bench-sd3", num_layers=8, attention_head_dim=64))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # measure what users get: Python caching the libraries' bytecode
    if not args.on_gpu:
        env["OMP_NUM_THREADS"] = "1"  # one core a process: N processes use N cores
    if not args.no_warm_up:  # a first run, not timed: as on a user's machine after their first run, the bytecode
        warm_up = subprocess.run([sys.executable, ROOT / "data-parallelism-accelerate.py", "--model", model,
                                  "--output-dir", work / "warm-up", "--prompt", "warm-up", "--height", str(args.size),
                                  "--width", str(args.size), "--num-inference-steps", "1", "--device", args.device],
                                 env=env,
                                 capture_output=True, text=True)
        if warm_up.returncode != 0:  # is cached
            sys.exit(f"error: the warm-up run failed:\n{warm_up.stderr[-3000:]}")
    prompts = [arg for i in range(args.prompts) for arg in ("--prompt", f"benchmark prompt number {i}")]
    rows = []
    for n in args.processes:
        out = work / f"out-{n}"
        script = [ROOT / "data-parallelism-accelerate.py", "--model", model, "--output-dir", out,
                  "--height", args.size, "--width", args.size, "--num-inference-steps", args.steps, "--device",
                  args.device, *prompts]
        started = time.perf_counter()
        result = subprocess.run([str(a) for a in launch(args.launcher, n, script)], env=env, capture_output=True,
                                text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"error: the run with {n} process(es) failed:\n{result.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        rows.append((n, wall, summary["generate_seconds"], summary["images"]))
        print(f"ran {n} process(es): {wall:.1f} s", file=sys.stderr)

    device = torch.accelerator.current_accelerator() if args.on_gpu else "cpu"
    print(f"\n{args.prompts} prompts, {args.size}x{args.size}, {args.steps} steps, {model}, on {device}, "
          f"launched with {args.launcher}\n")
    print("| processes | wall time (s) | images/s | efficiency | generation time (s) | images/s | efficiency |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base_wall, base_gen = args.prompts / rows[0][1] / rows[0][0], args.prompts / rows[0][2] / rows[0][0]
    for n, wall, gen, _ in rows:
        print(f"| {n} | {wall:.1f} | {args.prompts / wall:.2f} | {args.prompts / wall / (n * base_wall):.2f} "
              f"| {gen:.1f} | {args.prompts / gen:.2f} | {args.prompts / gen / (n * base_gen):.2f} |")


if __name__ == "__main__":
    main()
