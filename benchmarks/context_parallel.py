"""How much faster is one image with context parallelism? Runs context-parallelism-flux.py with 1 process (the
baseline: no parallelism) and with N, and prints a table: the whole run as the user waits for it (start-up,
imports, loading, generating, saving), the pipeline call alone, the time per denoising step, the speedups, and
how far the N-process image is from the 1-process one, for each size: by default 512x512 (1024 image tokens, which
the processes share evenly) and 496x496 (961 tokens, 31 x 31, which 2 processes do not: diffusers' ulysses_anything
splits them unevenly, at the cost of a size exchange in every attention).

    uv run benchmarks/context_parallel.py                       # CPU: a random-weight FLUX, 1 and 2 processes
    uv run benchmarks/context_parallel.py --processes 1 2 4 --model black-forest-labs/FLUX.1-dev --sizes 1024

On the CPU every process gets one thread (OMP_NUM_THREADS=1), so N processes use N cores. With no --model, a FLUX.1
pipeline with a random-weight transformer big enough that compute, not the all-to-all, dominates (hidden size 768:
12 heads of 64, 2 double-stream + 4 single-stream blocks, 81 M parameters; --hidden changes it) and the tiny text
encoders and VAE is built in a temporary folder; at 512x512 its sequence is 1024 image + 512 prompt tokens.
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
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from PIL import Image
from transformers import CLIPTextModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from utils.tiny_pipelines import TEXT_DIM, _clip_config, _t5, _vae, clip_tokenizer, t5_tokenizer  # noqa: E402

SCRIPT = ROOT / "context-parallelism-flux.py"


def build_pipeline(out, hidden=768, heads=12, blocks=(2, 4)):
    """A FluxPipeline whose transformer has random weights and `hidden` = heads x head size; tiny text encoders and
    VAE, so that the transformer is nearly all of the work."""
    torch.manual_seed(0)
    head_dim = hidden // heads
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    rope = [head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8]  # FLUX.1's split of a head: 16, 56, 56 of 128
    FluxPipeline(
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=blocks[0],
                                           num_single_layers=blocks[1], attention_head_dim=head_dim,
                                           num_attention_heads=heads, joint_attention_dim=TEXT_DIM,
                                           pooled_projection_dim=TEXT_DIM, axes_dims_rope=rope),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModel(_clip_config(clip)), tokenizer=clip, text_encoder_2=_t5(t5), tokenizer_2=t5,
    ).save_pretrained(out)
    return out


def per_step_seconds(stdout):
    """The script's own figures: `made ... in 12.3 s, 1.50 s per step, ...` -> 1.50."""
    return float(re.search(r" ([\d.]+) s per step", stdout).group(1))


def call_seconds(stdout):
    return float(re.search(r"\) in ([\d.]+) s, ", stdout).group(1))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: the GPUs where torch can use them, else the CPU; cpu: the CPU on purpose, even "
                             "beside GPUs (the script's --device) (default: %(default)s)")
    parser.add_argument("--processes", type=int, nargs="+",
                        help="process counts to run; the first is the baseline (default: 1 and every device, or 1 "
                             "and 2 on the CPU)")
    parser.add_argument("--model", help="pipeline to run (default: a random-weight FLUX built on the spot)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 496],
                        help="image heights and widths, one table row group each; 496 is 961 image tokens, which 2 "
                             "processes share unevenly (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each process count, taken in turn; the table shows the best of them, the "
                             "least disturbed by whatever else the machine runs (default: %(default)s)")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="skip the untimed first run that lets Python cache the libraries' bytecode (where a "
                             "run before this one cached it already)")
    parser.add_argument("--hidden", type=int, default=768,
                        help="with no --model: the random transformer's hidden size, in heads of 64 (default: "
                             "%(default)s)")
    args = parser.parse_args()
    args.on_gpu = args.device != "cpu" and torch.accelerator.is_available()
    devices = torch.accelerator.device_count() if args.on_gpu else min(os.cpu_count(), 2)
    args.processes = args.processes or sorted({1, devices})
    return args


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="context-parallel-") as tmp:
        measure(args, Path(tmp))


def measure(args, work):
    model = args.model or str(build_pipeline(work / "bench-flux", hidden=args.hidden, heads=args.hidden // 64))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # measure what users get: Python caching the libraries' bytecode
    if not args.on_gpu:
        env["OMP_NUM_THREADS"] = "1"  # one core a process: N processes use N cores
    rows = [row for pixels in args.sizes for row in measure_size(args, work, model, env, pixels)]
    device = torch.accelerator.current_accelerator() if args.on_gpu else "cpu"
    model = args.model or f"a random-weight FLUX (hidden {args.hidden})"
    print(f"\n{args.steps} steps, {model}, on {device}, best of {args.repeats} run(s) each\n")
    print("| size | processes | whole run (s) | speedup | pipeline call (s) | speedup | per step (s) | speedup | "
          "largest pixel difference from 1 process |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size, (n, wall, call, step, pixels), (_, wall0, call0, step0, pixels0) in rows:
        print(f"| {size}x{size} | {n} | {wall:.1f} | {wall0 / wall:.2f} | {call:.1f} | {call0 / call:.2f} | "
              f"{step:.2f} | {step0 / step:.2f} | {np.abs(pixels - pixels0).max()} of 255 |")


def measure_size(args, work, model, env, pixels_high):
    """Each process count at one size: (size, its best times and image, the baseline's)."""
    size = ["--height", str(pixels_high), "--width", str(pixels_high)]
    # a first run (at the first size), not timed: as on a user's machine after their first run, the bytecode
    if not args.no_warm_up and pixels_high == args.sizes[0]:
        warm_up = subprocess.run([sys.executable, SCRIPT, "--model", model, *size, "--num-inference-steps", "1",
                                  "--output", work / "warm-up.png", "--device", args.device], env=env,
                                 capture_output=True, text=True)
        if warm_up.returncode != 0:  # is cached
            sys.exit(f"error: the warm-up run failed:\n{warm_up.stderr[-3000:]}")
    best = {}  # processes -> the best (least) of each time over the repeats, and the image
    for n in [n for _ in range(args.repeats) for n in args.processes]:  # 1, 2, 1, 2: in turn, not 1, 1, 2, 2
        out = work / f"{n}.png"
        script = [SCRIPT, "--model", model, *size, "--num-inference-steps", str(args.steps), "--output", out,
                  "--device", args.device]
        # One process is a plain run, as the user starts the baseline; N are started by torchrun.
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
        print(f"ran {n} process(es) at {pixels_high}x{pixels_high}: {wall:.1f} s", file=sys.stderr)
    return [(pixels_high, (n, *best[n]), (args.processes[0], *best[args.processes[0]])) for n in args.processes]


if __name__ == "__main__":
    main()
