"""What do sharded weights cost, and what do they save? Runs context-parallelism-flux.py on one image as 1 process
(the baseline), as N processes with context parallelism (each holds the whole pipeline), and as N processes with
--shard-weights (each holds 1/N of the transformer's and of the largest text encoder's weights, and gathers each
block's weights just before it runs), with and without prefetching the next block, and prints a table: the share of
the transformer's parameters each process holds, the whole run, the pipeline call and the time per step with their
speedups over 1 process, the bytes each process gathers a step and, on the CPU, the time those gathers take (there
they block the process, so the rest of the step is compute), each process's peak memory, and how far the image is
from the 1-process image. Then the same gathers on paper for FLUX.1-dev and Qwen-Image on 2 and 4 GPUs over each
link's published bandwidth: a projection, not a measurement.

On a GPU the gathers' time is not given ("n/a"): NCCL's and XCCL's all-gather returns to the host once it is queued,
and runs on the device beside the compute, so a clock on the host around it reads almost nothing (torch.profiler
shows the device's time); and the memory column is each GPU's peak allocation during the pipeline call (the
script's report), not the process's resident memory.

    uv run benchmarks/sharded_weights.py                       # CPU: a random-weight FLUX of 144 M parameters
    uv run benchmarks/sharded_weights.py --processes 4 --model black-forest-labs/FLUX.1-dev --size 1024 --steps 28

On the CPU every process gets one thread (OMP_NUM_THREADS=1), so N processes use N cores. With no --model, a FLUX.1
pipeline whose transformer has random weights (hidden size 1024: 16 heads of 64, 2 double-stream + 4
single-stream blocks, 144 M parameters; --hidden changes it) and the tiny text encoders and VAE is built in a
temporary folder. What happens inside the processes is measured there, by a `sitecustomize` this benchmark puts on
their PYTHONPATH: every all-gather FSDP makes (torch.distributed's all_gather_single: its bytes, and the host's time
in it), at the start of the denoising loop and at each step; with "no prefetch" it also turns FSDP's
set_modules_to_forward_prefetch into nothing, so that each block's gather is issued only when the block is called.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from context_parallel import build_pipeline, call_seconds, per_step_seconds  # noqa: E402

SCRIPT = ROOT / "context-parallelism-flux.py"
GB = 1e9
GiB = 2**30
# The runs: name -> (label, sharded, prefetch, the script's other flags). "one" is the baseline, a plain process.
# "bfloat16" gathers half the bytes of float32 weights, and computes faster or slower than float32 as the CPU's matrix
# units go: compare it with "context-bfloat16", the same dtype unsharded, not with the float32 rows.
BF16 = ["--dtype", "bfloat16"]
RUNS = {"one": ("1 process", False, True, []), "context": ("context parallel", False, True, []),
        "sharded": ("context parallel, weights sharded", True, True, []),
        "no-prefetch": ("context parallel, weights sharded, no prefetch", True, False, []),
        "context-bfloat16": ("context parallel, in bfloat16", False, True, BF16),
        "bfloat16": ("context parallel, weights sharded, in bfloat16", True, True, BF16)}
DEFAULT_RUNS = ["one", "context", "sharded", "no-prefetch"]
# Each direction of one GPU's link, in GB/s (10^9 bytes), as published: the least time a step's gathers can take.
LINKS = {
    "NVLink 4 (H100 SXM)": (450, "NVIDIA H100 datasheet: 900 GB/s of NVLink per GPU, both directions together"),
    "PCIe 5.0 x16": (63, "PCI-SIG, PCIe 5.0: 32 GT/s a lane, 128b/130b encoding, 16 lanes"),
    "PCIe 4.0 x16": (31.5, "PCI-SIG, PCIe 4.0: 16 GT/s a lane, 128b/130b encoding, 16 lanes (Arc A770)"),
    "PCIe 5.0 x8": (31.5, "PCI-SIG, PCIe 5.0 with 8 lanes (Arc Pro B60)"),
}
# Inside every process of a run: FSDP's all-gathers counted and timed, snapshots at the denoising loop's start and
# at each step, written at exit; with BENCH_NO_PREFETCH, no explicit prefetch.
PROBE = textwrap.dedent("""
    import atexit, json, os, time
    if os.environ.get("BENCH_PROBE") and "RANK" in os.environ:
        import torch.distributed as dist
        import diffusers

        seen = {"bytes": 0, "received": 0, "seconds": 0.0, "calls": 0, "start": None, "steps": []}
        gather = dist.all_gather_single

        def counted(output_tensor, input_tensor, *args, **kwargs):
            started = time.perf_counter()
            work = gather(output_tensor, input_tensor, *args, **kwargs)
            if work is not None:
                work.wait()
            seen["seconds"] += time.perf_counter() - started
            seen["bytes"] += output_tensor.numel() * output_tensor.element_size()
            seen["received"] += (output_tensor.numel() - input_tensor.numel()) * output_tensor.element_size()
            seen["calls"] += 1
            return None

        dist.all_gather_single = counted
        snapshot = lambda: {k: seen[k] for k in ("bytes", "received", "seconds", "calls")} | {"t": time.perf_counter()}
        progress_bar = diffusers.DiffusionPipeline.progress_bar

        def loop_starts(self, *args, **kwargs):
            seen["start"] = snapshot()
            return progress_bar(self, *args, **kwargs)

        diffusers.DiffusionPipeline.progress_bar = loop_starts
        step = diffusers.FlowMatchEulerDiscreteScheduler.step

        def stepped(self, *args, **kwargs):
            result = step(self, *args, **kwargs)
            seen["steps"].append(snapshot())
            return result

        diffusers.FlowMatchEulerDiscreteScheduler.step = stepped
        if os.environ.get("BENCH_NO_PREFETCH"):
            from torch.distributed.fsdp import FSDPModule
            FSDPModule.set_modules_to_forward_prefetch = lambda self, modules: None

        def write():
            with open(os.path.join(os.environ["BENCH_PROBE"], "rank%s.json" % os.environ["RANK"]), "w") as f:
                json.dump(seen, f)

        atexit.register(write)
""")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="processes of the parallel runs (default: 2)")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=DEFAULT_RUNS,
                        help="which runs, in this order; the first is the baseline (default: %(default)s)")
    parser.add_argument("--model", help="pipeline to run (default: a random-weight FLUX built on the spot)")
    parser.add_argument("--size", type=int, default=1024, help="image height and width (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each kind, taken in turn; the table shows the best of them (default: "
                             "%(default)s)")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="skip the untimed first run that lets Python cache the libraries' bytecode")
    parser.add_argument("--hidden", type=int, default=1024,
                        help="with no --model: the random transformer's hidden size, in heads of 64 (default: "
                             "%(default)s)")
    parser.add_argument("--link", action="append", default=[], metavar="NAME=GB/s",
                        help="add a link to the projection, e.g. 'my link=25' (GB/s each way, as measured or "
                             "published for your GPUs)")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: the GPUs where torch can use them, else the CPU; cpu: the CPU on purpose, even "
                             "beside GPUs (the script's --device) (default: %(default)s)")
    args = parser.parse_args()
    args.on_gpu = args.device != "cpu" and torch.accelerator.is_available()
    if args.on_gpu and torch.accelerator.device_count() < args.processes:
        parser.error(f"--processes {args.processes} needs as many GPUs, and this machine has "
                     f"{torch.accelerator.device_count()}: run it on the CPU (--device cpu)")
    return args


def main():
    args = parse_args()
    links = dict(LINKS)
    for link in args.link:
        name, _, rate = link.rpartition("=")
        links[name] = (float(rate), "given with --link")
    with tempfile.TemporaryDirectory(prefix="sharded-weights-") as tmp:
        rows = measure(args, Path(tmp))
    print_table(args, rows)
    print_projection(args, links)


def measure(args, work):
    model = args.model or str(build_pipeline(work / "bench-flux", hidden=args.hidden, heads=args.hidden // 64))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # measure what users get: Python caching the libraries' bytecode
    if not args.on_gpu:
        env["OMP_NUM_THREADS"] = "1"  # one core a process: N processes use N cores
    (work / "probe").mkdir()
    (work / "probe" / "sitecustomize.py").write_text(PROBE, encoding="utf-8")
    size = ["--height", str(args.size), "--width", str(args.size), "--device", args.device]
    if not args.no_warm_up:  # as on a user's machine after their first run: the bytecode is cached
        warm_up = subprocess.run([sys.executable, SCRIPT, "--model", model, *size, "--num-inference-steps", "1",
                                  "--output", work / "warm-up.png"], env=env, capture_output=True, text=True)
        if warm_up.returncode != 0:
            sys.exit(f"error: the warm-up run failed:\n{warm_up.stderr[-3000:]}")
    best = {}
    for name in [name for _ in range(args.repeats) for name in args.runs]:  # in turn, not one kind after another
        label, sharded, prefetch, flags = RUNS[name]
        n = 1 if name == "one" else args.processes
        out, probes = work / f"{name}.png", work / f"probe-{name}"
        probes.mkdir(exist_ok=True)
        script = [SCRIPT, "--model", model, *size, "--num-inference-steps", str(args.steps), "--output", out,
                  *(["--shard-weights"] if sharded else []), *flags]
        torchrun = [Path(sys.executable).parent / "torchrun", "--nproc-per-node", str(n), "--standalone"]
        command = [sys.executable, *script] if n == 1 else [*torchrun, *script]
        run_env = dict(env, PYTHONPATH=os.pathsep.join([str(work / "probe"), env.get("PYTHONPATH", "")]),
                       BENCH_PROBE=str(probes), **({} if prefetch else {"BENCH_NO_PREFETCH": "1"}))
        started = time.perf_counter()
        result = subprocess.run([str(a) for a in command], env=run_env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"error: the run {label!r} failed:\n{result.stderr[-3000:]}")
        row = {"label": label, "processes": n, "wall": wall, "call": call_seconds(result.stdout),
               "step": per_step_seconds(result.stdout), "load": load_average(),
               "held": held(result.stdout), "peaks": re.findall(r"on \S+ ([\d.]+) GiB", result.stdout),
               "gathers": gathers([json.loads(p.read_text()) for p in sorted(probes.glob("rank*.json"))], args.steps)}
        with Image.open(out) as image:
            row["pixels"] = np.asarray(image.convert("RGB"), dtype=np.int16)
        if name not in best or wall < best[name]["wall"]:
            best[name] = row
        print(f"ran {label} ({n} process(es)) at {args.size}x{args.size}: {wall:.1f} s, load {row['load']}",
              file=sys.stderr)
    return [best[name] for name in args.runs]


def held(stdout):
    """The script's own line: `weights sharded: transformer: each process held at most 72 of its 144 parameters
    (0.50)` -> 0.50; 1.00 where the transformer is whole."""
    match = re.search(r"weights sharded: transformer: .*\(([\d.]+)\)", stdout)
    return float(match.group(1)) if match else 1.0


def gathers(probes, steps):
    """Per process and per step, from the probes: the bytes FSDP gathered (the whole blocks), the bytes it received
    from the other processes, and the seconds the gathers took; the most of any process."""
    if not probes or not probes[0]["steps"] or probes[0]["start"] is None:
        return None
    per_step = []
    for probe in probes:
        first, last = probe["start"], probe["steps"][-1]
        per_step.append({key: (last[key] - first[key]) / len(probe["steps"]) for key in ("bytes", "received",
                                                                                         "seconds", "t")})
    return {key: max(p[key] for p in per_step) for key in per_step[0]}


def load_average():
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"


def print_table(args, rows):
    device = torch.accelerator.current_accelerator() if args.on_gpu else "cpu"
    model = args.model or f"a random-weight FLUX (hidden {args.hidden})"
    base = rows[0]
    print(f"\n{args.size}x{args.size}, {args.steps} steps, {model}, on {device}, best of {args.repeats} run(s) "
          f"each\n")
    # On a GPU the script reports each GPU's peak allocation during the call; on the CPU, each process's peak
    # resident memory over its whole life (loading included).
    memory = "peak GPU memory allocated in the call (GiB)" if args.on_gpu else "peak resident memory (GiB)"
    print("| run | processes | transformer held by each | whole run (s) | speedup | pipeline call (s) | speedup | "
          f"per step (s) | gathered a step, each process | gathers a step (s) | {memory} | "
          "largest pixel difference | load |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for row in rows:
        g = row["gathers"]
        gathered, seconds = (f"{g['bytes'] / 2**20:.0f} MiB", "n/a" if args.on_gpu else f"{g['seconds']:.2f}") if (
            g) else ("-", "-")
        print(f"| {row['label']} | {row['processes']} | {row['held']:.2f} | {row['wall']:.1f} | "
              f"{base['wall'] / row['wall']:.2f} | {row['call']:.1f} | {base['call'] / row['call']:.2f} | "
              f"{row['step']:.2f} | {gathered} | {seconds} | {', '.join(row['peaks'])} | "
              f"{np.abs(row['pixels'] - base['pixels']).max()} of 255 | {row['load']} |")
    for row in rows:
        g = row["gathers"]
        if g and g["t"] and args.on_gpu:
            print(f"\n{row['label']}: a step took {g['t']:.2f} s; each process gathered {g['bytes'] / 2**20:.0f} MiB "
                  f"a step, {g['received'] / 2**20:.0f} MiB of it from the others (the gathers' time on the GPU: "
                  "torch.profiler)")
        elif g and g["t"]:
            print(f"\n{row['label']}: a step took {g['t']:.2f} s, of which the gathers {g['seconds']:.2f} s "
                  f"({g['seconds'] / g['t']:.0%}) and the rest {g['t'] - g['seconds']:.2f} s: each process gathered "
                  f"{g['bytes'] / 2**20:.0f} MiB a step, {g['received'] / 2**20:.0f} MiB of it from the others")


def print_projection(args, links):
    """On paper: each GPU receives (N - 1)/N of the transformer's weights every step (a ring all-gather of each
    block), in bfloat16; at a link's published bandwidth each way, that is the least a step's gathers take. They can
    be hidden where the step's compute takes longer: FSDP gathers on a stream of its own, beside the compute."""
    print("\nProjection, not a measurement: the least time the gathers of one step take on GPUs, each receiving "
          "(N-1)/N of the transformer's bfloat16 weights a step at its link's published bandwidth (each way):\n")
    print("| model | GPUs | gathered a step, each GPU | " + " | ".join(links) + " |")
    print("| --- | ---: | ---: |" + " ---: |" * len(links))
    for model, path in (("FLUX.1-dev", ROOT / "tests" / "fixtures" / "flux1-dev"),
                        ("Qwen-Image", ROOT / "tests" / "fixtures" / "qwen-image")):
        weights = transformer_bytes(path)
        for n in (2, 4):
            received = weights * (n - 1) / n
            print(f"| {model} | {n} | {received / GiB:.1f} GiB | "
                  + " | ".join(f"{received / (rate * GB):.3f} s" for rate, _ in links.values()) + " |")
    print("\nBandwidths: " + "; ".join(f"{name}: {rate:g} GB/s ({source})" for name, (rate, source) in links.items()))


def transformer_bytes(configs):
    """The transformer's bfloat16 bytes, from its published config (tests/fixtures), built with no weights."""
    index = DiffusionPipeline.load_config(configs)
    cls = getattr(diffusers, index["transformer"][1])
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # Qwen-Image's published config has a key its class ignores
    with torch.device("meta"):
        transformer = cls.from_config(cls.load_config(configs, subfolder="transformer"))
    diffusers.utils.logging.set_verbosity(verbosity)
    return sum(p.numel() for p in transformer.parameters()) * 2


if __name__ == "__main__":
    main()
