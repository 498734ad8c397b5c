# SPDX-License-Identifier: MIT
# Follows diffusers' distributed inference guide, with the guidance batch split between two GPUs as xDiT's CFG
# parallelism does: https://huggingface.co/docs/diffusers/training/distributed_inference
"""CFG parallelism: one Stable Diffusion 3.5 image made by two GPUs at once, each GPU running half of the guidance.

Classifier-free guidance runs the transformer at every step on a batch of two: the latents with the negative prompt
(the unconditional half) and the latents with the prompt. Every GPU holds the whole pipeline, as in data
parallelism, but both make the SAME image: at each step GPU 0 runs the transformer on the negative half and GPU 1
on the prompt's half, the two predictions are exchanged (one all-gather of a few hundred KB), and both processes
then take the same step. Two forward hooks on the transformer (public torch API) do it; diffusers has no CFG
parallelism of its own.

Use it to make one SD3.5 image about twice as fast when the pipeline fits on each GPU (SD3.5-medium: 15.2 GiB in
bfloat16). Exactly 2 processes: the guidance batch has two halves. For more GPUs or many images,
data-parallelism-accelerate.py (a copy per GPU); for a guidance-distilled model (FLUX.1-dev, which runs its
transformer once a step), context-parallelism-flux.py splits the tokens instead.

    uv run torchrun --nproc-per-node 2 cfg-parallelism-sd3.py                       # 2 GPUs (Intel or NVIDIA)
    uv run accelerate launch --num_processes 2 cfg-parallelism-sd3.py               # the same, with accelerate
    uv run cfg-parallelism-sd3.py                                                   # 1 GPU: the baseline
    uv run cfg-parallelism-sd3.py --plan --device-memory 16GiB                      # will it fit? no download
    uv run torchrun --nproc-per-node 2 cfg-parallelism-sd3.py --model tiny/sd3 --height 64 --width 64 \
        --num-inference-steps 2                                                     # on the CPU

Launcher options go before the script's name. On the CPU `accelerate launch` needs --multi_gpu to start several
processes. Every process starts from the same noise (a CPU generator, the same seed); only the main process saves
the image, which is the image one process makes alone (to rounding).
"""

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
import warnings
from collections import Counter
from datetime import timedelta
from pathlib import Path

import diffusers
import huggingface_hub
import psutil
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import compute_module_sizes, convert_file_size_to_int, gather_object
from diffusers import AutoencoderKL, DiffusionPipeline
from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
DEFAULT_PROMPT = "a red fox in fresh snow, wildlife photograph"  # one of the data parallel script's prompts
LAUNCHER_FLAGS = ("--num-processes", "--num_processes", "--multi-gpu", "--multi_gpu", "--nproc-per-node",
                  "--nproc_per_node", "--num-machines", "--num_machines", "--machine-rank", "--machine_rank",
                  "--mixed-precision", "--mixed_precision", "--config-file", "--config_file")
GiB = 2**30
RESERVE_AT_1024 = 3 * GiB  # activations at 1024x1024, scaled with the pixels: every process decodes the whole image

# diffusers imports transformers' image processors (for IP-Adapters, which this sample never uses), and without
# torchvision transformers warns about them in every process. Silence that warning alone; the others still show.
logging.getLogger("transformers.utils.import_utils").addFilter(lambda record: "torchvision" not in record.getMessage())


def main():
    args = parse_args()
    # Know before loading, from the configs alone (the model built on the meta device, no weights): that this model
    # does classifier-free guidance at this scale, that 2 processes were launched, and what each GPU must hold.
    plan = check_before_loading(args)
    if args.plan:
        return show_plan(args, plan)

    # 1. One process per device, in one group (form_the_group), as in the other scripts: Accelerate reads the
    #    launcher's rank and world size and picks this process's device; the group joins the GPUs with their own
    #    backend (xccl on Intel GPUs, nccl on NVIDIA) and the CPUs with gloo. A week's timeout: the first run
    #    downloads 16 GB; a stall is --stall-timeout's.
    distributed_state, device = form_the_group(args)
    set_up_this_process(args, plan, distributed_state, device)  # its GPU's memory, the baseline's note

    # 2. Every process loads the WHOLE pipeline onto its own device.
    pipeline = load_sd3(args, plan).to(device)
    pipeline.set_progress_bar_config(disable=not distributed_state.is_main_process)

    # 3. CFG parallelism: each process runs the transformer on its half of the guidance batch, and the two
    #    exchange their halves' predictions (split_the_guidance_batch: two hooks, near the end of this file).
    if distributed_state.num_processes == 2:
        split_the_guidance_batch(pipeline.transformer, torch.distributed.group.WORLD)

    # 4. Generate: both processes run the same call from the same noise (a CPU generator, the same seed) and take
    #    the same steps; a process whose steps stop ends the job (--stall-timeout) instead of leaving the other
    #    waiting in the next all-gather.
    wait_for_everyone(device)  # every process has loaded: from here on, steps are expected
    watchdog = StallWatchdog(args.stall_timeout, distributed_state.is_main_process, args.num_inference_steps)
    clock = StepClock(device, watchdog)
    image = pipeline(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                     num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                     max_sequence_length=args.max_sequence_length,
                     generator=torch.Generator("cpu").manual_seed(args.seed), callback_on_step_end=clock.step).images[0]
    clock.stop()

    # 5. The main process saves the image, whole or not at all, and reports every process's numbers.
    stats = gather_object([{"rank": distributed_state.process_index, "device": str(device),
                            "peak": peak_memory_in_words(device)}])
    watchdog.close()  # after the last collective: a process that stopped before it is still caught
    if distributed_state.is_main_process:
        save(image, args.output)
        report_the_run(args, plan, stats, image, clock)


def check_before_loading(args):
    """Every check that needs no weights, then the plan: a plan alone loads nothing and starts no processes (it may
    be for GPUs this machine lacks), so it skips the checks of this machine and its launch."""
    if not args.plan:
        check_torch_can_use_the_gpus(args.device)  # never hours on the CPU, without a word, on a machine with GPUs
        check_two_processes()  # the guidance batch has two halves: 2 processes, or 1 for the baseline
        check_launch(args)  # one process per device, and a torch that can join them into a group
    plan = plan_the_split(args)
    if not args.plan:
        check_it_fits_in_ram(plan)
    return plan


def set_up_this_process(args, plan, distributed_state, device):
    """After joining the group: the libraries quiet but on the main process, its GPU's free memory checked, the
    baseline's note."""
    quiet_libraries(main_process=distributed_state.is_main_process, verbose=args.verbose)
    check_gpu_memory(plan, device)  # each process, its own GPU
    if distributed_state.num_processes == 1 and distributed_state.is_main_process:
        print(two_process_note(), file=sys.stderr, flush=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Hub id or local folder of a StableDiffusion3Pipeline: SD3.5-medium or -large, SD3-medium "
                             "(default: %(default)s)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="what to draw (default: %(default)r)")
    parser.add_argument("--negative-prompt", default="",
                        help="what not to draw: the guidance's other half, made by process 0 (default: none)")
    parser.add_argument("--height", type=int, default=1024, help="image height in pixels (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1024, help="image width in pixels (default: %(default)s)")
    parser.add_argument("--num-inference-steps", type=int, default=40,
                        help="denoising steps (default: %(default)s, as SD3.5-medium's model card)")
    parser.add_argument("--guidance-scale", type=float, default=4.5,
                        help="classifier-free guidance; above 1, or there is no guidance batch to split (default: "
                             "%(default)s, as SD3.5-medium's model card)")
    parser.add_argument("--max-sequence-length", type=int, default=256,
                        help="T5 prompt tokens, at most 512 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("sd3.5-cfg-parallel.png"),
                        help="the image, written by the main process (default: %(default)s)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="weights' dtype; auto is bfloat16 on GPUs and float32 on the CPU (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: each process on a GPU of its own where torch can use the GPUs, else the CPU; "
                             "cpu: on the CPU on purpose, even on a machine with GPUs (default: %(default)s)")
    parser.add_argument("--stall-timeout", type=int, default=600, metavar="SECONDS",
                        help="end the job with one line when no denoising step has finished for this long (and 10 "
                             "times the slowest step): a process that stopped would keep the other waiting in the "
                             "next exchange for a week (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="also show the main process's loading bars")
    parser.add_argument("--plan", action="store_true",
                        help="load no weights, start no processes: print the split and what each GPU must hold")
    parser.add_argument("--json", action="store_true", help="with --plan: print the plan as one JSON document")
    parser.add_argument("--device-memory", metavar="SIZE",
                        help="with --plan: free memory of each of the 2 GPUs, e.g. 16GiB (default: that present)")
    args, unknown = parser.parse_known_args()
    for arg in unknown:
        if arg.split("=")[0] in LAUNCHER_FLAGS:
            fail(f"{arg} is an option of the launcher, not of this script: put it before the script's name, "
                 f"e.g. `torchrun --nproc-per-node 2 {Path(__file__).name}`")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for name in ("height", "width", "num_inference_steps", "max_sequence_length"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be a positive number, not {getattr(args, name)}")
    if args.max_sequence_length > 512:
        fail(f"--max-sequence-length {args.max_sequence_length}: SD3's T5 takes at most 512 tokens")
    if args.stall_timeout <= 0:
        fail(f"--stall-timeout must be a positive number of seconds, not {args.stall_timeout}")
    if not args.plan and (args.json or args.device_memory is not None):
        fail("--json and --device-memory describe a plan: add --plan")
    if args.device_memory is not None:
        try:
            args.device_memory = convert_file_size_to_int(args.device_memory)
        except ValueError:
            fail(f"--device-memory {args.device_memory}: write a size like 16GiB or 24GB")
    if not args.plan:  # find out now, not after loading 16 GB and 40 steps, that the image cannot be saved
        if args.output.is_dir():
            fail(f"--output {args.output} is a folder: name the image file, e.g. {args.output / 'sd3.5.png'}")
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"--output {args.output}: cannot create its folder ({e.strerror})")
        if not os.access(args.output.parent, os.W_OK):
            fail(f"--output {args.output}: its folder is not writable")
    return args


def check_two_processes():
    """The guidance batch has two halves, one per process: 2 processes, or 1 (the baseline, no parallelism)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes not in (1, 2):
        fail(f"{processes} processes: CFG parallelism gives each of exactly 2 processes one half of the guidance "
             f"batch (the negative prompt's, the prompt's): launch 2 (`torchrun --nproc-per-node 2 "
             f"{Path(sys.argv[0]).name}`), or 1 for the baseline; for more GPUs, data-parallelism-accelerate.py "
             "makes many images at once, a copy per GPU")


def two_process_note():
    """A single process makes the image alone, with no parallelism: the baseline. Say how to launch 2."""
    command = " ".join([f"uv run torchrun --nproc-per-node 2 {Path(sys.argv[0]).name}",
                        *map(shlex.quote, sys.argv[1:])])
    on_the_cpu = "" if torch.accelerator.is_available() else (
        " (on the CPU: `accelerate launch --multi_gpu`, or torchrun)")
    return (f"note: one process: it runs both halves of the guidance batch itself, with no parallelism (the "
            f"baseline); `{command}` gives each of 2 processes one half{on_the_cpu}")


# --- the plan: from the configs alone, before anything is loaded ---


def plan_the_split(args):
    """What the run needs, from the model's configs on the meta device (no weights): that it is an SD3 pipeline
    doing classifier-free guidance, the split, the weights of each component, and what each GPU must hold."""
    index, vae = read_the_configs(args.model)
    pipeline = index.get("_class_name")
    if pipeline == "FluxPipeline":
        fail(f"--model {args.model} is a FLUX.1 pipeline, which does no classifier-free guidance (FLUX.1-dev is "
             "guidance-distilled: the guidance is an input of its transformer, run once a step on the prompt "
             "alone): there is no guidance batch to split; context-parallelism-flux.py makes one FLUX image with "
             "several GPUs")
    if pipeline != "StableDiffusion3Pipeline":
        fail(f"--model {args.model} is a {pipeline}: this script splits StableDiffusion3Pipeline's guidance batch "
             "(SD3, SD3.5); context-parallelism-flux.py makes one image with several GPUs for the models diffusers "
             "can split by context parallelism (FLUX.1, Flux2, QwenImage...), data-parallelism-accelerate.py "
             "many images with any pipeline")
    if args.guidance_scale <= 1:  # the pipeline's do_classifier_free_guidance is guidance_scale > 1
        fail(f"--guidance-scale {args.guidance_scale:g}: at 1 or below StableDiffusion3Pipeline does no "
             "classifier-free guidance (it runs the transformer once a step, on the prompt alone), so there is no "
             "guidance batch for 2 processes to split: use a scale above 1 (SD3.5's model cards: 3.5 to 4.5)")
    # The VAE shrinks images 8x (2 per block after the first) and SD3's transformer works on 2x2 patches of that.
    latent_scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value % (2 * latent_scale):
            fail(f"{flag} {value} does not suit {args.model}: use a multiple of {2 * latent_scale}, "
                 f"e.g. {max(2 * latent_scale, value // (2 * latent_scale) * 2 * latent_scale)}")
    on_gpu = args.device_memory is not None or (args.device != "cpu" and torch.accelerator.is_available())
    dtype = run_dtype(args)
    components = weigh_components(args.model, index, dtype)
    weights = sum(components.values())
    reserve = int(RESERVE_AT_1024 * args.height * args.width / 1024**2)
    # What passes between the GPUs at each step: one half's prediction each way, the size of the latents.
    latents = vae.get("latent_channels", 16) * (args.height // latent_scale) * (args.width // latent_scale)
    return {"model": args.model, "pipeline": pipeline, "processes": 2, "guidance_batch": 2, "batch_per_process": 1,
            "height": args.height, "width": args.width, "dtype": str(dtype).removeprefix("torch."),
            "components": components, "weights": weights, "reserved_for_activations": reserve,
            "needs": weights + reserve, "exchanged_per_step": latents * dtype.itemsize,
            "device": "GPU" if on_gpu else "cpu"}


def read_the_configs(model):
    """model_index.json and the VAE's config.json: a few kilobytes."""
    path = Path(model).expanduser()
    if path.exists() and not (path / "model_index.json").exists():
        fail(f"--model {model} is not a diffusers pipeline folder: it has no model_index.json")
    if not path.exists() and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model):
        fail(f"--model {model}: no such folder, and not a Hub id (organisation/name)")
    diffusers.utils.logging.set_verbosity_error()  # a failed Hub look-up is said once, by us, not three times
    huggingface_hub.utils.logging.set_verbosity_error()
    with explained_load_errors(model), warnings.catch_warnings(action="ignore"):
        index = DiffusionPipeline.load_config(model)
        vae = AutoencoderKL.load_config(model, subfolder="vae") if index.get("vae") else {}
    diffusers.utils.logging.set_verbosity_warning()  # from here on, the libraries' warnings show again
    huggingface_hub.utils.logging.set_verbosity_warning()
    return index, vae


def fits(plan, free, processes_here=1):
    """Whether each GPU (or, on the CPU, the RAM of this machine's processes) holds what the run needs, and the one
    line that says what to do where it does not."""
    if plan["device"] == "cpu":  # every process holds a copy in RAM
        need = plan["needs"] * processes_here
        return need <= free, (f"{plan['model']} does not fit: {processes_here} process(es) on the CPU need "
                              f"{size(need)} of RAM, a copy each, and {size(free)} is free: free some memory")
    return plan["needs"] <= free, (
        f"{plan['model']} does not fit: each GPU holds the whole pipeline: it needs {size(plan['needs'])} "
        f"({size(plan['weights'])} of weights, {size(plan['reserved_for_activations'])} for activations) and has "
        f"{size(free)} free: data-parallelism-accelerate.py offloads SD3.5 to the CPU on smaller GPUs (one image "
        "each, slower); or make smaller images")


def show_plan(args, plan):
    """--plan: the split, and whether each GPU can hold what it must, without loading anything."""
    where, memory = plan_memory(args)
    ok, why = fits(plan, memory, 2 if plan["device"] == "cpu" else 1)
    plan = {**plan, "device_memory": memory, "fits": ok, "problems": [] if ok else [why]}
    if args.json:
        return print(json.dumps(plan, indent=2))
    print(f"plan for {args.model} in {plan['dtype']}, {args.height}x{args.width}, 2 processes, one per "
          f"{'GPU' if plan['device'] != 'cpu' else 'CPU process'}, on {where} with {size(memory)} free:")
    print(f"  split: the guidance batch of 2 (negative prompt, prompt), 1 per process; the processes exchange "
          f"{size(plan['exchanged_per_step'])} of predictions per step, each way")
    for name, b in sorted(plan["components"].items(), key=lambda item: item[1], reverse=True):
        print(f"  {name:<16} {size(b):>10}")
    print(f"  {'weights':<16} {size(plan['weights']):>10}, and {size(plan['reserved_for_activations'])} kept free for "
          "activations, on every GPU")
    print(f"  whole pipeline on each GPU:  needs {size(plan['needs'])}")
    for problem in plan["problems"]:
        print(f"  NO: {problem}")
    print(f"  fits: {'yes' if plan['fits'] else 'NO'}")


def check_it_fits_in_ram(plan):
    """Before any process loads anything, on the CPU: every process of this machine keeps a copy in RAM."""
    if plan["device"] == "cpu":
        ok, why = fits(plan, psutil.virtual_memory().available, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if not ok:
            fail(why, code=1)


def check_gpu_memory(plan, device):
    """Each process, on its own GPU: the whole pipeline, plus activations."""
    if device.type != "cpu":
        ok, why = fits(plan, free_memory(device))
        if not ok:
            fail(f"{device}: {why}", code=1, every_process=True)


# --- loading, saving, reporting ---


def load_sd3(args, plan):
    """The whole pipeline at the run's dtype: the plan found a StableDiffusion3Pipeline in its model_index.json.
    (DiffusionPipeline imports that class only now, after the warnings filter at the top of this file: importing
    it at the start has transformers warn, twice, about image processors this script never uses.)"""
    with explained_load_errors(args.model):  # e.g. the configs came from the cache but the weights cannot be fetched
        return DiffusionPipeline.from_pretrained(args.model, dtype=getattr(torch, plan["dtype"]))


def report_the_run(args, plan, stats, image, clock):
    n = len(stats)
    print(f"split: the guidance batch of 2 between {n} process(es): " + (
        "1 each, rank 0 the negative prompt's half, rank 1 the prompt's" if n > 1 else "both halves in this one"))
    print(f"made {args.output} ({image.width}x{image.height}) in {clock.seconds:.2f} s, {clock.per_step():.3f} s per "
          f"step, "
          f"{time.time() - psutil.Process().create_time():.1f} s since the start; peak memory: "
          + "; ".join(f"rank {s['rank']} on {s['device']} {s['peak']}" for s in stats))


# --- The guards every script has, copied word for word: utils/check_copies.py keeps the copies identical ---


# Copied from data-parallelism-accelerate.py::fail
def fail(message, code=2, every_process=False):
    """One line on stderr and a non-zero exit, no traceback.

    A bad input fails every process alike, so only the first process of each machine says it; the others wait
    a moment, so that the launcher, which stops the whole job when one process ends, does not cut that line
    short. A failure of one process alone (out of memory) is said by that process."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if every_process or local_rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(1)
    sys.exit(code)


# Copied from data-parallelism-accelerate.py::end_process_group
def end_process_group():
    """Leave the process group, if this process is in one, on every way out (a failure's too): left to the
    interpreter's exit, gloo now and then aborts the process ("terminate called without an active exception") and
    NCCL adds its own warning to the script's one line. Garbage goes first: a process group that only garbage
    still holds (a device mesh's, in a model already dropped) would otherwise be freed during the exit, with the
    same abort."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


# Copied from data-parallelism-accelerate.py::form_the_group
def form_the_group(args):
    """One process per device, all of them in one process group; returns Accelerate's state and this process's
    device. Accelerate reads the rank and world size the launcher set and picks this process's device (xpu:<local
    rank>, cuda:<local rank>: the local rank modulo the devices this process sees). The group is formed here, with
    two backends: the GPUs' own for their tensors (xccl on Intel GPUs, nccl on NVIDIA) and gloo for what is
    exchanged on the CPU (the prompts' split, each process's numbers, diffusers' size exchanges), named "cpu:gloo"
    on every machine, the CPU-only ones too. It forms through the launcher's key-value store (the "env://"
    rendezvous that init_process_group would make itself): first each process says there which GPU it got, before
    the GPUs' backend connects them (check_one_process_per_device). The group waits a week for a process that is
    still loading or generating, not NCCL's 10 minutes: a process that stops is for --stall-timeout to end."""
    cpu = args.device == "cpu" or not torch.accelerator.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.distributed.is_available():  # a plain run forms none
        week = timedelta(days=7)
        store, rank, world_size = next(torch.distributed.rendezvous("env://", timeout=week))
        backend = "cpu:gloo"
        if not cpu:
            kind = torch.accelerator.current_accelerator().type  # "xpu" or "cuda"
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            check_one_process_per_device(store, rank, world_size, torch.device(
                kind, local_rank % torch.accelerator.device_count()))  # the device Accelerate will pick
            backend += f",{kind}:{torch.distributed.Backend.default_device_backend_map[kind]}"
        torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=week)
    distributed_state = PartialState(cpu=cpu)
    check_group_formed(distributed_state)
    return distributed_state, process_device(distributed_state)


# Copied from data-parallelism-accelerate.py::check_one_process_per_device
def check_one_process_per_device(store, rank, world_size, device):
    """Two processes on one GPU: where a mask shows several processes the same GPUs (CUDA_VISIBLE_DEVICES=0 for
    2 processes: a Slurm job given one GPU, a mask set to hide a laptop's screen GPU), their local ranks pick the
    same device, and the GPUs' backend fails on it ("Duplicate GPU detected") or they share its memory. Each
    process writes the GPU it got into the launcher's store, by UUID where torch gives one (else by machine, mask
    and index), and reads the others'; two on one GPU are refused in one line, before the backend connects them."""
    uuid = getattr(torch.get_device_module(device).get_device_properties(device), "uuid", None)
    mask = " ".join(f"{name}={os.environ[name]}" for name in ("CUDA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")
                    if os.environ.get(name) is not None)
    store.set(f"gpu-of-rank-{rank}", json.dumps({"gpu": str(uuid) if uuid else [socket.gethostname(), mask, str(
        device)], "device": str(device), "host": socket.gethostname(), "mask": mask}))
    first = {}  # each GPU, and the first rank on it
    for other in range(world_size):
        said = json.loads(store.get(f"gpu-of-rank-{other}"))
        gpu = json.dumps(said["gpu"])
        if gpu in first:
            shown = f"{said['mask']} shows these processes the same GPUs" if said["mask"] else (
                "each process picks the GPU of its local rank")
            fail(f"ranks {first[gpu]} and {other} would both run on {said['device']} of {said['host']} ("
                 f"{said['gpu'] if isinstance(said['gpu'], str) else 'the same GPU'}): {shown}; start one process "
                 "per GPU (torchrun: --nproc-per-node, accelerate launch: --num_processes), or give each process a "
                 "GPU of its own")
        first[gpu] = other


# Copied from data-parallelism-accelerate.py::check_group_formed
def check_group_formed(distributed_state):
    """Several processes that formed no group would each do the whole job alone: stop instead."""
    if distributed_state.num_processes != int(os.environ.get("WORLD_SIZE", "1")):
        fail(f"the launcher started {os.environ['WORLD_SIZE']} processes but they formed no group, so each would "
             f"do the whole job alone: this torch ({torch.__version__}) has no torch.distributed; install one that "
             "has (PyPI's, or torch's XPU build for Intel GPUs)")


# Copied from data-parallelism-accelerate.py::quiet_libraries
def quiet_libraries(main_process, verbose):
    """One copy of the libraries' warnings is enough (the main process's); their loading bars, which would cut
    through the script's own lines, show with --verbose."""
    for library in (diffusers, transformers):
        if not main_process:
            library.utils.logging.set_verbosity_error()
        if not (verbose and main_process):
            library.utils.logging.disable_progress_bar()


# Copied from data-parallelism-accelerate.py::check_torch_can_use_the_gpus
def check_torch_can_use_the_gpus(device):
    """No silent CPU run: where this machine has GPUs that the installed torch cannot use, stop before anything
    is loaded, with the likely cause and the fix. Without this, PyPI's torch (no XPU support) on an Intel GPU, or
    its CUDA 13 build under an older NVIDIA driver, runs everything on the CPU, for hours, without a word."""
    if device == "cpu" or torch.accelerator.is_available():
        return
    gpus = gpus_on_the_pci_bus()
    hidden = {maker: why for maker in gpus if (why := why_hidden(maker, gpus[maker]))}
    if hidden and not set(gpus) - set(hidden):  # hidden on purpose, or not in this container: nothing to fix
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"note: {'; '.join(hidden.values())}: running on the CPU", file=sys.stderr, flush=True)
        return
    keep = ("then `export UV_NO_SYNC=1` so that `uv run` keeps it (docs/setup.md); or pass --device cpu to run on "
            "the CPU on purpose")
    if "NVIDIA" in gpus and "NVIDIA" not in hidden:  # first: a laptop may have an Intel GPU for the screen
        cuda = torch.version.cuda  # "13.2"; None in a torch built without CUDA
        # The oldest driver each CUDA major version runs on (NVIDIA's "minor version compatibility" table).
        driver = {"11": "450", "12": "525", "13": "580"}.get(str(cuda).split(".")[0])
        needs = f"NVIDIA driver {driver} or newer" if driver else f"an NVIDIA driver for CUDA {cuda}"
        cause = "it is not a CUDA build: install one" if cuda is None else (
            f"it is built for CUDA {cuda}, which needs {needs} (`nvidia-smi` shows yours): update the driver, or "
            "install a torch built for an older CUDA")
        fail(f"this machine has an NVIDIA GPU, but this torch ({torch.__version__}) cannot use it: {cause}: "
             f"`uv pip install --reinstall torch --index-url https://download.pytorch.org/whl/cu128`, {keep}")
    if "Intel" in gpus and "Intel" not in hidden:
        fail(f"this machine has an Intel GPU, but this torch ({torch.__version__}) cannot use it: it is not the XPU "
             "build (PyPI's torch has no XPU support): `uv pip install --reinstall torch --index-url "
             f"https://download.pytorch.org/whl/xpu`, {keep}")


# Copied from data-parallelism-accelerate.py::gpus_on_the_pci_bus
def gpus_on_the_pci_bus():
    """The makers of this machine's GPUs and how many each, read from the PCI devices Linux lists (what `lspci`
    reads): a display device (PCI class 0x03....) from NVIDIA (vendor 0x10de) or Intel (0x8086). Intel's bridges
    and other controllers are no GPU. Empty where there is no such folder (Windows, macOS): there, nothing is
    checked. A container sees its host's PCI bus, GPUs it was not given included. Tests point SYSFS_PCI_DEVICES
    at a fake tree."""
    makers = {"0x10de": "NVIDIA", "0x8086": "Intel"}
    found = Counter()
    for pci_device in Path(os.environ.get("SYSFS_PCI_DEVICES", "/sys/bus/pci/devices")).glob("*"):
        try:
            vendor, pci_class = ((pci_device / name).read_text().strip().lower() for name in ("vendor", "class"))
        except OSError:  # not a device folder, or unreadable
            continue
        if vendor in makers and pci_class.startswith("0x03"):
            found[makers[vendor]] += 1
    return found


# Copied from data-parallelism-accelerate.py::why_hidden
def why_hidden(maker, count):
    """Why torch cannot see this maker's GPUs where that is meant, not a torch to fix (None where it is not): the
    user hid them all (CUDA_VISIBLE_DEVICES="" or -1; ZE_AFFINITY_MASK naming none of the `count` GPUs), or this
    process has none of their device nodes (/dev/nvidia0..., /dev/dri/renderD...): a container given no GPU, or
    no driver loaded. Tests point DEVICE_NODES at a fake /dev."""
    variable, nodes = {"NVIDIA": ("CUDA_VISIBLE_DEVICES", "nvidia[0-9]*"),
                       "Intel": ("ZE_AFFINITY_MASK", "dri/renderD*")}[maker]
    mask = os.environ.get(variable)
    if mask is not None and (mask.strip() or maker == "NVIDIA"):  # an empty ZE_AFFINITY_MASK hides nothing
        # CUDA stops reading its list at the first entry that names no GPU; Level Zero skips such entries.
        entries = [e.strip().split(".")[0] for e in mask.split(",")][:1 if maker == "NVIDIA" else None]
        if not any(e.startswith(("GPU-", "MIG-")) or e.isdigit() and int(e) < count for e in entries):
            return f"{variable}={mask} hides every {maker} GPU"
    dev = Path(os.environ.get("DEVICE_NODES", "/dev"))
    if not any(dev.glob(nodes)):
        return (f"this machine has {maker} GPUs but no {dev / nodes} device node to reach them (a container given "
                "none, or no driver loaded)")
    return None


# Copied from data-parallelism-accelerate.py::check_launch
def check_launch(args):
    """Launch mistakes, caught before any process joins a group, each said by the first process of each machine."""
    if args.device == "cpu" or not torch.accelerator.is_available():
        return  # CPU processes share the CPU: any number of them is fine
    kind = torch.accelerator.current_accelerator().type  # "xpu" or "cuda"
    devices = torch.accelerator.device_count()
    here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # this machine's processes (torchrun and accelerate set it)
    script = Path(sys.argv[0]).name
    # --multi_gpu: without it, an accelerate config that says "no distributed training" would start one process.
    launch = f"uv run accelerate launch --multi_gpu --num_processes {devices} {script}" if devices > 1 else (
        f"uv run {script}")
    # A launcher (or the user) may give each process GPUs of its own with CUDA_VISIBLE_DEVICES or ZE_AFFINITY_MASK:
    # then each sees fewer devices than there are processes here, and Accelerate picks one it sees. A mask is the
    # user's choice: one that gives two processes the same GPU is NCCL's "Duplicate GPU" error at the first collective.
    masked = any(os.environ.get(variable) for variable in ("CUDA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK"))
    if here > devices and not masked:  # two processes on one device: NCCL stops at its first collective
        fail(f"{here} processes on this machine, but it has {devices} {kind} device(s): start one process per "
             f"device, e.g. `{launch}` (torchrun: --nproc-per-node {devices})")
    backend = torch.distributed.Backend.default_device_backend_map.get(kind)  # xpu: xccl, cuda: nccl
    if backend and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (
            torch.distributed.is_available() and torch.distributed.is_backend_available(backend)):
        fix = {"xccl": "install the XPU build of torch 2.8 or newer: `uv pip install --reinstall torch "
                       "--index-url https://download.pytorch.org/whl/xpu`",
               "nccl": "torch has NCCL on Linux only: run on Linux (or WSL), or run one process"}.get(
                   backend, f"install a torch built with {backend}")
        fail(f"this torch ({torch.__version__}) lacks the {backend} backend that processes on {kind} devices need "
             f"to work as a group: {fix}")


# Copied from data-parallelism-accelerate.py::run_dtype
def run_dtype(args):
    """The weights' dtype: as asked, or the GPU's (default_dtype), or float32 on the CPU."""
    on_gpu = args.device_memory is not None or (args.device != "cpu" and torch.accelerator.is_available())
    return getattr(torch, args.dtype) if args.dtype != "auto" else default_dtype(on_gpu, announce=not args.plan)


# Copied from data-parallelism-accelerate.py::default_dtype
def default_dtype(on_gpu, announce=False):
    """--dtype auto: float32 on the CPU (bfloat16 is slow there). On GPUs bfloat16 where they compute it natively
    (NVIDIA Ampere and newer, Intel's GPUs), else float16: NVIDIA GPUs before Ampere (Turing, Volta, Pascal)
    emulate bfloat16 slowly or not at all. A plan for GPUs this machine does not have takes bfloat16."""
    if not on_gpu:
        return torch.float32
    if not torch.accelerator.is_available():
        return torch.bfloat16
    gpus = torch.get_device_module(torch.accelerator.current_accelerator())
    if gpus.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    if announce and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"note: {gpus.get_device_name()} has no fast bfloat16: using float16 (--dtype bfloat16 to override)",
              file=sys.stderr, flush=True)
    return torch.float16


# Copied from data-parallelism-accelerate.py::explained_load_errors
@contextlib.contextmanager
def explained_load_errors(model):
    """A model that cannot be loaded: one line with what went wrong and what to do, not a traceback."""
    try:
        yield
    except (OSError, ValueError) as error:
        reason = None
        while reason is None and error is not None:  # diffusers wraps the Hub's error: look down the chain
            if isinstance(error, GatedRepoError):
                reason = "it is gated, and this account has not been granted access"
            elif isinstance(error, RepositoryNotFoundError):
                reason = "no such model on the Hub, or it is private"
            elif (isinstance(error, (OfflineModeIsEnabled, ConnectionError))
                  or "Name or service not known" in str(error)):
                reason = "it is not in the local cache, and the Hub cannot be reached"
            elif error.__cause__ is None and error.__context__ is None:
                reason = str(error).splitlines()[0]
            error = error.__cause__ or error.__context__
        fail(f"cannot load --model {model} ({reason}). If it is gated, accept its licence on "
             f"https://huggingface.co/{model} and run `hf auth login` (black-forest-labs/FLUX.1-schnell is not "
             f"gated); or pass --model PATH to a local copy")


# Copied from data-parallelism-accelerate.py::process_device
def process_device(distributed_state):
    """This process's device. In a CPU process group Accelerate says "cpu:0": moving the weights from "cpu" to
    "cpu:0" would copy every one of them, twice the memory for nothing."""
    device = distributed_state.device
    return torch.device("cpu") if device.type == "cpu" else device


# Copied from data-parallelism-accelerate.py::free_memory
def free_memory(device):
    """Free memory of this one device (bytes). Asking every device would open a context, and take memory, on each.
    Where it cannot be read (some Intel GPUs), its total memory, and a note that says so."""
    get_memory_info = getattr(torch.accelerator, "get_memory_info", None)  # torch 2.10 or newer
    try:
        return (get_memory_info or getattr(torch, device.type).mem_get_info)(device)[0]
    except RuntimeError:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"note: the free memory of {device} cannot be read: counting on the total memory instead",
                  file=sys.stderr, flush=True)
        return torch.get_device_module(device).get_device_properties(device).total_memory


# Copied from data-parallelism-accelerate.py::size
def size(b):
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:.1f} MiB"


# Copied from context-parallelism-flux.py::peak_memory_in_words
def peak_memory_in_words(device):
    """This process's peak memory, as words: on a GPU what it allocated and reserved there (nvidia-smi and xpu-smi
    show the reserved, and a few hundred MB of context), on the CPU its peak resident memory."""
    if device.type != "cpu":
        allocated, reserved = gpu_memory(device, peak=True)
        return f"{allocated / GiB:.2f} GiB allocated, {reserved / GiB:.2f} GiB reserved"
    if sys.platform == "win32":
        return f"{psutil.Process().memory_info().peak_wset / GiB:.2f} GiB resident"
    import resource  # Unix only; ru_maxrss is in KiB on Linux, in bytes on macOS

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"{rss / GiB:.2f} GiB resident"


# Copied from data-parallelism-accelerate.py::gpu_memory
def gpu_memory(device, peak=False):
    """The memory of one GPU that this process holds (or its peak), in bytes: (allocated, reserved). Allocated is
    what torch's tensors hold; reserved is what torch's caching allocator holds from the GPU, allocated or not:
    what nvidia-smi and xpu-smi show for the process, less its context (a few hundred MB)."""
    if peak:
        return torch.accelerator.max_memory_allocated(device), torch.accelerator.max_memory_reserved(device)
    return torch.accelerator.memory_allocated(device), torch.accelerator.memory_reserved(device)


# Copied from context-parallelism-flux.py::save
def save(image, path):
    """Written whole under a temporary name, then renamed: never half an image on disk."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:  # a full disk, most often
        fail(f"cannot write {path} ({e.strerror or e}): make room, or choose another --output", code=1)
    finally:
        tmp.unlink(missing_ok=True)


# Copied from context-parallelism-flux.py::wait_for_everyone
def wait_for_everyone(device):
    """Wait until every process of the group is here (a barrier), on this process's own device. Accelerate's
    wait_for_everyone names the device of the local rank (cuda:1 for local rank 1) wherever torch can use a GPU:
    not the device of a process whose GPU a mask renumbered (each process sees its one GPU as device 0), and a GPU
    for processes on the CPU too (--device cpu on a machine with GPUs). On the CPU this names none: torch then
    takes the group's CPU backend, gloo."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier(device_ids=None if device.type == "cpu" else [device.index])


# Copied from context-parallelism-flux.py::StepClock
class StepClock:
    """The pipeline call's time and the end of each of its steps (its callback_on_step_end, which also tells the
    watchdog); started, it resets the GPU's peak memory. On a GPU the host queues work ahead of the device: each
    step's end is read once the device has done that step's work (a synchronize: the device then waits, once a
    step, while the host queues the next step's first kernels), so that "s per step" is the GPU's time, not the
    time to queue it."""

    def __init__(self, device, watchdog):
        if device.type != "cpu":
            torch.accelerator.reset_peak_memory_stats(device)
        self.device, self.watchdog, self.step_ends, self.seconds = device, watchdog, [], None
        self.t0 = time.perf_counter()

    def step(self, pipeline, step, timestep, callback_kwargs):
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)
        self.step_ends.append(time.perf_counter())
        self.watchdog.beat()
        return {}

    def stop(self):
        self.seconds = time.perf_counter() - self.t0

    def per_step(self):
        return (self.step_ends[-1] - self.t0) / len(self.step_ends) if self.step_ends else self.seconds


# Copied from context-parallelism-flux.py::StallWatchdog
class StallWatchdog:
    """Ends this process when no denoising step has finished for --stall-timeout seconds (and 10 times the slowest
    step so far). The processes make one image together and meet in a collective at every step: one that stops (a
    GPU or driver that no longer answers, a file system that hangs) would keep the others waiting in the next
    collective for the group's timeout, a week. A thread of each process watches its own steps; the main process
    says it in one line and exits, the others exit a moment later without a word, and the launcher stops what is
    left. `os._exit`: the main thread is stuck in a collective, and cannot run Python's exit."""

    def __init__(self, seconds, main_process, steps):
        self.seconds, self.main_process, self.steps = seconds, main_process, steps
        self.made, self.slowest, self.last = 0, 0.0, time.monotonic()
        self.stop = threading.Event()
        threading.Thread(target=self.watch, name="stall-watchdog", daemon=True).start()

    def beat(self):
        """A step has finished (the pipeline's callback_on_step_end)."""
        now = time.monotonic()
        self.made, self.slowest, self.last = self.made + 1, max(self.slowest, now - self.last), now

    def watch(self):
        while not self.stop.wait(min(1.0, self.seconds / 10)):
            waited, limit = time.monotonic() - self.last, max(self.seconds, 10 * self.slowest)
            if waited > limit + (0 if self.main_process else 5):  # the main process's line first
                if self.main_process:
                    print(f"\nerror: no denoising step for {waited:.0f} s ({self.made} of {self.steps} made, the "
                          f"slowest in {self.slowest:.1f} s): a process of the group has stopped; ending the job "
                          "(--stall-timeout SECONDS waits longer)", file=sys.stderr, flush=True)
                os._exit(1)

    def close(self):
        self.stop.set()


# Copied from context-parallelism-flux.py::weigh_components
def weigh_components(model, index, dtype):
    """What each component weighs at `dtype`, from its config.json alone: built on torch's meta device (shapes, no
    weights), as from_pretrained builds it before it loads the weights."""
    sizes = {}
    for name, spec in index.items():
        library, class_name = spec if isinstance(spec, list) and len(spec) == 2 else (None, None)
        if library not in ("diffusers", "transformers"):
            continue
        cls = getattr(importlib.import_module(library), class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, (diffusers.ModelMixin, transformers.PreTrainedModel))):
            continue  # tokenizers and schedulers hold no weights
        with explained_load_errors(model), warnings.catch_warnings(action="ignore"), torch.device("meta"):
            module = (cls.from_config(cls.load_config(model, subfolder=name)) if issubclass(cls, diffusers.ModelMixin)
                      else cls(transformers.AutoConfig.from_pretrained(model, subfolder=name)))
        # Under float16, transformers keeps the layers a model names in `_keep_in_fp32_modules` in float32 (T5's `wo`).
        keep = set(getattr(cls, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else set()
        float32 = {n: torch.float32 for n, _ in module.named_parameters() if set(n.split(".")) & keep}
        sizes[name] = compute_module_sizes(module, dtype=dtype, special_dtypes=float32)[""]
    return sizes


# Copied from context-parallelism-flux.py::plan_memory
def plan_memory(args):
    """The memory the plan is for: --device-memory, else the present GPU with the least free, else the RAM."""
    if args.device_memory is not None:
        return "a GPU", args.device_memory
    if args.device != "cpu" and torch.accelerator.is_available():
        kind = torch.accelerator.current_accelerator().type
        free = {i: free_memory(torch.device(kind, i)) for i in range(torch.accelerator.device_count())}
        index = min(free, key=free.get)
        return f"{kind}:{index}", free[index]
    return "cpu", psutil.virtual_memory().available


def split_the_guidance_batch(transformer, group):
    """CFG parallelism on the transformer, between the 2 processes of `group` (a process group: every process of
    the job in cfg-parallelism-sd3.py; a group of 2 of them in data-parallelism-accelerate.py --cfg-parallel):
    before each call, a forward pre-hook keeps this process's half of the doubled guidance batch, chosen by its rank
    in the group; after it, a forward hook all-gathers the two halves' predictions within the group, so that the
    pipeline goes on (noise_pred.chunk(2), the guidance, the scheduler's step) as if this process had run the whole
    batch. A call whose batch is not the doubled guidance batch runs whole, on both processes. (The pipelines call
    the transformer with return_dict=False: its output is a tuple, the prediction first.)"""
    rank = torch.distributed.get_rank(group)  # in the group: 0 or 1, whatever this process's rank in the job
    split = [False]  # whether the call now running was split: the pre-hook says, the forward hook reads
    # The transformer's inputs that the pipeline doubles for guidance (torch.cat([latents] * 2), and the prompt's
    # embeddings as torch.cat([negative, prompt])): each process keeps its half of these; the others stay whole.
    doubled = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")

    def take_my_half(module, args, kwargs):
        split[0] = is_the_guidance_batch(kwargs)
        if not split[0]:
            return None  # nothing changed: this call runs whole
        # The pipeline built the batch as [negative, prompt]: the group's rank 0 keeps the first half, the negative
        # (unconditional) one; its rank 1 the second, the prompt's.
        return args, {name: value.chunk(2)[rank] if name in doubled else value
                      for name, value in kwargs.items()}

    def gather_both_halves(module, args, kwargs, output):
        if not split[0]:
            return None
        # The one exchange of the step: each process of the group sends its half's prediction and receives the
        # other's, in the group's rank order (negative first), the batch of two the pipeline expects back.
        prediction = output[0]
        both = prediction.new_empty((2 * prediction.shape[0], *prediction.shape[1:]))
        torch.distributed.all_gather_into_tensor(both, prediction.contiguous(), group=group)
        return (both, *output[1:])

    transformer.register_forward_pre_hook(take_my_half, with_kwargs=True)
    transformer.register_forward_hook(gather_both_halves, with_kwargs=True)


def is_the_guidance_batch(kwargs):
    """The pipeline's guidance call: an even batch of latents whose halves are the same latents (the pipeline's
    torch.cat([latents] * 2)). Skip-layer guidance's extra call, on the prompt's half alone, is not one."""
    latents = kwargs.get("hidden_states")
    if latents is None or latents.shape[0] % 2:
        return False
    negative, prompt = latents.chunk(2)
    return torch.equal(negative, prompt)


if __name__ == "__main__":
    # A launcher stops the other processes with SIGTERM when one fails: exit through Python, so that
    # nothing is left half-written, instead of dying on the spot.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except torch.OutOfMemoryError:  # on the one process that ran out: say which, and what to try
        state = PartialState()
        fail(f"rank {state.process_index} ran out of memory on {state.device}: try a smaller --height/--width; "
             "--plan shows what fits", code=1, every_process=True)
    finally:  # every way out, fail() and SIGTERM included, leaves the process group first
        end_process_group()
