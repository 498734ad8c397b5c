# SPDX-License-Identifier: MIT
# Follows Accelerate's distributed inference guide:
#   https://huggingface.co/docs/accelerate/usage_guides/distributed_inference
"""Data parallelism: every GPU holds a whole copy of the pipeline and makes its own share of the images.

Use it when the model fits on one device and you have many prompts: N devices make N images at a time.
Hugging Face Accelerate does the set-up: `PartialState` starts one process per device and gives each its
device, and `split_between_processes` hands each process its share of the prompts. Every prompt is made
exactly once, and prompt i always gets the same picture (its seed is --seed + i), however many processes run.

    uv run accelerate launch --num_processes 2 data-parallelism-accelerate.py        # 2 GPUs (Intel or NVIDIA)
    uv run torchrun --nproc-per-node 2 data-parallelism-accelerate.py                 # the same, with torchrun
    uv run accelerate launch --multi_gpu --num_processes 2 data-parallelism-accelerate.py --model tiny/sd3  # CPU
    uv run data-parallelism-accelerate.py --plan --device-memory 12GiB       # will it fit on a 12 GB card?

Launcher options (--num_processes, --multi_gpu, ...) go *before* the script's name: what comes after it is
handed to the script. The images land in --output-dir as 000-<prompt>.png, 001-..., with manifest.jsonl.
Running the same command again makes only the images that are missing.

Each GPU must hold the pipeline: SD3.5-medium is 15.2 GiB in bfloat16, plus activations. Where it does not fit
whole (12 and 16 GB cards), each process uses diffusers' model CPU offload on its own GPU, and says so; --plan
tells beforehand, from the configs alone, which memory mode each process will use.
"""

import argparse
import contextlib
import gc
import importlib
import inspect
import json
import logging
import math
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
import psutil
import torch
import transformers
from accelerate import PartialState
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import broadcast_object_list, compute_module_sizes, convert_file_size_to_int, gather_object
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.utils import make_image_grid
from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError
from PIL import Image
from tqdm import tqdm

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
DEFAULT_PROMPTS = [
    "a dog in a field of sunflowers, golden hour",
    "a lighthouse on a cliff in a storm, oil painting",
    "a red fox in fresh snow, wildlife photograph",
    "a bowl of ramen on a wooden table, studio lighting",
]
CONTACT_SHEET, SHEET_IMAGES, THUMBNAIL = "contact-sheet.png", 64, 256  # at most 64 thumbnails, 256 px each
LAUNCHER_FLAGS = ("--num-processes", "--num_processes", "--multi-gpu", "--multi_gpu", "--nproc-per-node",
                  "--nproc_per_node", "--num-machines", "--num_machines", "--machine-rank", "--machine_rank",
                  "--mixed-precision", "--mixed_precision", "--config-file", "--config_file")
GiB = 2**30
RESERVE_AT_1024 = 3 * GiB  # activations of the transformer and the VAE for one 1024x1024 image, scaled with pixels
TEXT_ENCODER_RESERVE = GiB // 2  # a text encoder reads a few hundred tokens: small activations at any image size

# diffusers imports transformers' image processors (for IP-Adapters, which this sample never uses), and without
# torchvision transformers warns about them in every process. Silence that warning alone; the others still show.
logging.getLogger("transformers.utils.import_utils").addFilter(lambda record: "torchvision" not in record.getMessage())


def main():
    args = parse_args()
    if not args.plan:  # a plan loads nothing and starts no processes: it may be for GPUs this machine lacks
        check_torch_can_use_the_gpus(args.device)  # never hours on the CPU, without a word, on a machine with GPUs
    prompts = read_prompts(args)
    check_model(args)  # fail now, not after every process has loaded 16 GB
    sizes = weigh_pipeline(args)  # from the configs alone (the meta device): what each GPU must hold, and the RAM
    if args.plan:
        return print_plan(args, sizes)
    check_launch(args)  # one process per device, and a torch that can join them into a group

    # 1. One process per device, in one group (form_the_group): Accelerate reads what the launcher set and picks
    #    this process's device (xpu:<local rank>, cuda:<local rank>); the group joins the GPUs with their own
    #    backend (xccl on Intel GPUs, nccl on NVIDIA) and the CPUs with gloo, and waits a week, not NCCL's 10
    #    minutes: a process that is done waits for the others (step 5).
    distributed_state, device = form_the_group(args)
    quiet_libraries(main_process=distributed_state.is_main_process, verbose=args.verbose)
    if distributed_state.num_processes == 1:
        idle_devices_note(args)  # one process on a machine of several GPUs: say how to use them all

    # 2. The main process finds what is left to make (images already on disk are kept) and tells the others, so
    #    that every process splits the same list, even one that starts after another has saved images.
    names = image_names(prompts)
    todo = [images_to_make(args, prompts, names) if distributed_state.is_main_process else None]
    todo = broadcast_object_list(todo)[0]
    progress = JobProgress(args, len(prompts), len(prompts) - len(todo)) if distributed_state.is_main_process else None

    # 3. Split the prompts: with 10 prompts and 4 processes, ranks 0 and 1 get 3 each, ranks 2 and 3 get 2
    #    (contiguous slices, no padding: a process whose share is shorter, or empty, simply makes fewer images).
    made, generate_seconds = 0, 0.0
    with distributed_state.split_between_processes(todo) as my_share:
        shares = gather_object([[i for i, _ in my_share]])  # every process's share, to name one that stops
        if my_share:  # an empty share loads nothing (an empty batch crashes the pipeline)
            pipeline, options, record = load_on_this_device(args, distributed_state, device, sizes)
            # 4. Each process makes its share, a batch at a time: prompt i's starting noise comes from SEED + i
            #    alone (a CPU generator), so 1 or N processes make the same images; each is saved as it is made.
            made, generate_seconds = make_images(args, pipeline, options, record, my_share, names)

    # 5. Wait for the others, but not for one that has stopped (--stall-timeout); gather every process's numbers.
    wait_for_the_others(args, distributed_state, shares)
    stats = gather_object([{"rank": distributed_state.process_index, "device": str(device), "images": made,
                            "generate_seconds": generate_seconds, **peak_memory(device)}])
    if distributed_state.is_main_process:  # the manifest in order, the contact sheet, the report
        finish(args, progress, stats, already=len(prompts) - len(todo), names=names)
    end_process_group()  # and on every other way out: see the end of this file


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Hub id or local folder of any diffusers text-to-image pipeline (default: %(default)s)")
    parser.add_argument("--prompt", action="append", default=[],
                        help="a prompt; repeat the flag for several")
    parser.add_argument("--prompts-file", type=Path,
                        help="a UTF-8 text file, one prompt a line (blank lines are skipped)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/data-parallelism"),
                        help="where the images and manifest.jsonl go (default: %(default)s)")
    parser.add_argument("--num-inference-steps", type=int, help="denoising steps (default: the pipeline's own)")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the pipeline's own)")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the model's native size)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i is seeded with SEED + i (default: %(default)s)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="weights' dtype; auto is bfloat16 on a GPU (float16 on NVIDIA GPUs before Ampere) and "
                             "float32 on the CPU (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="prompts per pipeline call in each process (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="make every image again, even those already in --output-dir")
    parser.add_argument("--verbose", action="store_true",
                        help="also show the main process's loading bars and the denoising steps of each pipeline call")
    parser.add_argument("--offload", choices=["auto", "none", "model", "sequential"], default="auto",
                        help="how each GPU holds the pipeline: none (whole, the fastest), model (its components take "
                             "turns on the GPU, the weights wait in system RAM), sequential (layer by layer, the "
                             "slowest); auto picks the first that fits (default: %(default)s)")
    parser.add_argument("--no-t5", action="store_true",
                        help="SD3 only: leave out the T5-XXL text encoder (9.5 GB less; the two CLIP encoders read "
                             "the prompt alone, so images differ a little)")
    parser.add_argument("--plan", action="store_true",
                        help="load no weights, start no processes: print the memory mode each GPU would use")
    parser.add_argument("--json", action="store_true", help="with --plan: print the plan as one JSON document")
    parser.add_argument("--device-memory", metavar="SIZE",
                        help="with --plan: plan for a GPU with SIZE free, e.g. 12GiB (default: the GPUs present)")
    parser.add_argument("--stall-timeout", type=int, default=600, metavar="SECONDS",
                        help="a process that is done stops waiting for the others when no image has been saved for "
                             "this long and 10 times the slowest image: the job ends, naming the processes that "
                             "stopped (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: each process on a GPU of its own where torch can use the GPUs, else the CPU; "
                             "cpu: on the CPU on purpose, even on a machine with GPUs (default: %(default)s)")
    args, unknown = parser.parse_known_args()
    for arg in unknown:
        if arg.split("=")[0] in LAUNCHER_FLAGS:
            fail(f"{arg} is an option of the launcher, not of this script: put it before the script's name, "
                 f"e.g. `accelerate launch --num_processes=2 {Path(__file__).name}`")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for name in ("num_inference_steps", "height", "width", "batch_size", "stall_timeout"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be a positive number, not {getattr(args, name)}")
    if not args.plan and (args.json or args.device_memory):
        fail("--json and --device-memory describe a plan: add --plan")
    if args.device_memory is not None:
        try:
            args.device_memory = convert_file_size_to_int(args.device_memory)
        except ValueError:
            fail(f"--device-memory {args.device_memory}: write a size like 12GiB or 16GB")
    if args.offload in ("model", "sequential") and not torch.accelerator.is_available() and args.device_memory is None:
        fail(f"--offload {args.offload} needs a GPU (Intel XPU or NVIDIA): it moves weights between system RAM and "
             "a GPU's memory, and there is none here; on the CPU the pipeline is used whole, in RAM")
    return args


def read_prompts(args):
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            text = args.prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read --prompts-file {args.prompts_file}: {getattr(e, 'strerror', None) or e}")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            fail(f"--prompts-file {args.prompts_file} has no prompts (one prompt a line)")
        prompts += lines
    if any(not p.strip() for p in prompts):
        fail("--prompt is empty: give it some text")
    return prompts or DEFAULT_PROMPTS


def check_model(args):
    """Fail early, before any process loads weights: the model can be found and can make images of this size."""
    model = Path(args.model).expanduser()
    if model.exists() and not (model / "model_index.json").exists():
        fail(f"--model {args.model} is not a diffusers pipeline folder: it has no model_index.json")
    if not model.exists() and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", args.model):
        fail(f"--model {args.model}: no such folder, and not a Hub id (organisation/name)")
    diffusers.utils.logging.set_verbosity_error()  # a failed Hub look-up is said once, by us, not three times
    # The configs only, a few kilobytes; the libraries' deprecation notices are not the user's.
    with explained_load_errors(args.model), warnings.catch_warnings(action="ignore"):
        components = DiffusionPipeline.load_config(args.model)
        vae = AutoencoderKL.load_config(args.model, subfolder="vae")
        patch = AutoencoderKL.load_config(args.model, subfolder="transformer").get("patch_size", 1) if (
            "transformer" in components) else 1
    diffusers.utils.logging.set_verbosity_warning()
    # The VAE shrinks images 8x (2 per block after the first), and a transformer works on 2x2 patches of that
    # (SD3 says patch_size=2; Flux packs 2x2 latents itself): sizes must be multiples of 16 for both.
    if "block_out_channels" not in vae:  # not an AutoencoderKL-style VAE: let the pipeline check the size itself
        return
    multiple = 2 ** (len(vae["block_out_channels"]) - 1) * (max(2, patch) if "transformer" in components else 1)
    for flag, size in (("--height", args.height), ("--width", args.width)):
        if size is not None and size % multiple:
            fail(f"{flag} {size} does not suit {args.model}: use a multiple of {multiple}, "
                 f"e.g. {max(multiple, size // multiple * multiple)}")


def weigh_pipeline(args):
    """What each component weighs at the run's dtype, from its config.json alone: the model is built on the meta
    device (shapes, no weights), as from_pretrained does before it loads them. Plus what the run needs beside the
    weights: activations for the image size, and the system RAM free before any process has loaded anything."""
    dtype = run_dtype(args)
    with warnings.catch_warnings(action="ignore"):
        index = DiffusionPipeline.load_config(args.model)
        transformer = (AutoencoderKL.load_config(args.model, subfolder="transformer")
                       if "transformer" in index else {})
        vae = AutoencoderKL.load_config(args.model, subfolder="vae") if "vae" in index else {}
    if args.no_t5 and "text_encoder_3" not in index:
        fail(f"--no-t5 is for SD3 pipelines, which have a T5 text encoder (text_encoder_3); {args.model} is a "
             f"{index.get('_class_name')}")
    components, buffers, largest_layer = {}, 0, 0
    for name, spec in index.items():
        library, class_name = spec if isinstance(spec, list) and len(spec) == 2 else (None, None)
        if library is None or class_name is None or (name == "text_encoder_3" and args.no_t5):
            continue
        # "diffusers" and "transformers", or a pipeline's own module ("stable_diffusion": its safety checker)
        package = library if library in ("diffusers", "transformers") else f"diffusers.pipelines.{library}"
        try:
            cls = getattr(importlib.import_module(package), class_name, None)
        except ImportError:
            continue
        if not (isinstance(cls, type) and issubclass(cls, (diffusers.ModelMixin, transformers.PreTrainedModel))):
            continue  # tokenizers and schedulers hold no weights
        # On torch's meta device, as transformers builds it (accelerate's init_empty_weights would untie T5's
        # input embeddings from its `shared` ones, and count 0.25 GiB twice).
        with warnings.catch_warnings(action="ignore"), torch.device("meta"):
            with explained_load_errors(args.model):  # e.g. a local folder without this component's config.json
                config = (cls.load_config(args.model, subfolder=name) if issubclass(cls, diffusers.ModelMixin) else
                          transformers.AutoConfig.from_pretrained(args.model, subfolder=name))
            module = cls.from_config(config) if issubclass(cls, diffusers.ModelMixin) else cls(config)
        # Under float16, transformers keeps the layers a model names in `_keep_in_fp32_modules` in float32 (T5's
        # `wo`: 2 GB more for T5-XXL), and diffusers does the same for its models.
        keep = (getattr(cls, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else []
        float32 = {n: torch.float32 for n, _ in module.named_parameters() if set(n.split(".")) & set(keep)}
        components[name] = compute_module_sizes(module, dtype=dtype, special_dtypes=float32)[""]
        # Sequential offload moves one layer's weights at a time to the GPU, and leaves the buffers there.
        buffers += compute_module_sizes(module, dtype=dtype, buffers_only=True)[""]
        largest_layer = max([largest_layer] + [sum(t.numel() for t in m.parameters(recurse=False)) * dtype.itemsize
                                               for m in module.modules()])
    # The image size the run makes: as asked, or the model's own (SD3.5: 128 latents x 8 = 1024 pixels).
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    native = transformer.get("sample_size", 128) * scale if isinstance(transformer.get("sample_size"), int) else 1024
    height, width = args.height or native, args.width or native
    return {"dtype": str(dtype).removeprefix("torch."), "height": height, "width": width, "components": components,
            "buffers": buffers, "largest_layer": largest_layer,
            "reserve": int(RESERVE_AT_1024 * height * width / 1024**2 * args.batch_size),
            # N processes on this machine, each with its own copy of the weights in RAM when they offload.
            "processes": int(os.environ.get("LOCAL_WORLD_SIZE", "1")), "ram": psutil.virtual_memory().available}


def print_plan(args, sizes):
    """--plan: the memory mode for the GPUs present (the one with the least free memory) or for --device-memory."""
    if args.device_memory is not None:
        device, device_memory, planned = "GPU", args.device_memory, True
    elif args.device != "cpu" and torch.accelerator.is_available():
        kind = torch.accelerator.current_accelerator().type
        free = {i: free_memory(torch.device(kind, i)) for i in range(torch.accelerator.device_count())}
        index = min(free, key=free.get)
        device, device_memory, planned = f"{kind}:{index}", free[index], False
    else:
        device, device_memory, planned = "cpu", sizes["ram"], False
    ram = None if planned else sizes["ram"]  # a GPU you do not have is in a machine whose RAM we cannot see
    # The run this plans: one process per GPU present, each with a copy of the weights in RAM if they offload.
    processes = torch.accelerator.device_count() if device != "cpu" and not planned else sizes["processes"]
    plan = choose_memory_mode(sizes, device_memory, args.offload, ram, processes)
    if device == "cpu":  # no offload without an accelerator: the pipeline is used whole, in RAM
        plan["fits"] = plan["needs"]["whole"] <= device_memory
        plan["mode"] = "whole"
    plan |= {"device": device, "dtype": sizes["dtype"], "height": sizes["height"], "width": sizes["width"],
             "batch_size": args.batch_size, "components": sizes["components"], "t5": not args.no_t5}
    if args.json:
        plan.pop("ram_fits")
        print(json.dumps(plan, indent=2))
        return
    where = f"a GPU with {size(device_memory)} free (planned)" if planned else f"{device}, {size(device_memory)} free"
    print(f"plan for {args.model} in {sizes['dtype']}, {sizes['height']}x{sizes['width']}, batch {args.batch_size}, "
          f"on {where}:")
    for name, b in sorted(sizes["components"].items(), key=lambda item: item[1], reverse=True):
        print(f"  {name:<16} {size(b):>10}")
    print(f"  {'weights':<16} {size(plan['weights']):>10}, and {size(plan['reserved_for_activations'])} kept free for "
          f"activations ({size(TEXT_ENCODER_RESERVE)} while a text encoder runs)")
    names = {"whole": "whole on the GPU", "model": "model CPU offload", "sequential": "sequential CPU offload"}
    for mode, need in plan["needs"].items() if device != "cpu" else ():
        ram = "" if mode == "whole" else f", and {size(plan['ram_needed'])} of system RAM"
        print(f"  {names[mode]:<23} needs {size(need):>10} on the GPU{ram}: "
              f"{'fits' if need <= device_memory else 'does not fit'}")
    if device != "cpu" and ram is not None and not plan["ram_fits"]:
        print(f"  system RAM: {size(plan['ram_needed'])} for {plan['processes']} process(es) offloading, "
              f"{size(ram)} free: offloading does not fit")
    if device == "cpu":
        print(f"  no GPU here: the pipeline runs whole on the CPU, and needs {size(plan['needs']['whole'])} of RAM "
              "(--device-memory SIZE plans for a GPU)")
    print(f"  mode: {plan['mode']}, fits: {'yes' if plan['fits'] else 'NO'}")


def choose_memory_mode(sizes, device_memory, offload="auto", ram=None, processes=1):
    """The memory mode of one process: the first of whole, model offload and sequential offload that fits its
    device's free memory (and, offloading, system RAM: one copy of the weights per process), or the mode asked."""
    components = sizes["components"]
    weights = sum(components.values())
    needs = {  # device memory each mode needs at its peak
        "whole": weights + sizes["reserve"],  # everything at once, while the VAE decodes
        "model": max((size + (TEXT_ENCODER_RESERVE if name.startswith("text_encoder") else sizes["reserve"])
                      for name, size in components.items()), default=0),  # the largest component, while it runs
        "sequential": sizes["buffers"] + sizes["largest_layer"] + sizes["reserve"],  # one layer at a time
    }
    ram_needed = processes * weights
    ram_fits = ram is None or ram_needed <= ram
    tried = ["whole", "model", "sequential"] if offload == "auto" else [{"none": "whole"}.get(offload, offload)]
    for mode in tried:
        fits = needs[mode] <= device_memory and (mode == "whole" or ram_fits)
        if fits:
            break
    return {"mode": mode, "fits": fits, "weights": weights, "largest_component": max(components.values(), default=0),
            "largest_component_name": max(components, key=components.get, default=None),
            "device_memory": device_memory, "needs": needs, "reserved_for_activations": sizes["reserve"],
            "ram_needed": ram_needed, "ram_available": ram, "ram_fits": ram_fits, "processes": processes}


def describe_mode(args, plan, device):
    """One line: the mode, why, what it costs, and how to turn it off."""
    mode, needs = plan["mode"], plan["needs"]
    why = (f"{args.model} needs {size(needs['whole'])} whole ({size(plan['weights'])} of weights, "
           f"{size(plan['reserved_for_activations'])} for activations) and {device} has {size(plan['device_memory'])} "
           "free")
    ram = f"{size(plan['weights'])} of system RAM per process"
    if not plan["fits"]:
        return (f"memory: --offload {args.offload} needs {size(needs[mode])} on {device}, which has "
                f"{size(plan['device_memory'])} free: trying anyway")
    if mode == "model":
        return (f"memory: model CPU offload on {device}, since {why}: the components take turns on the GPU (at most "
                f"{size(needs['model'])}), which costs some seconds an image and {ram}; --offload none turns it off")
    if mode == "sequential":
        return (f"memory: sequential CPU offload on {device}, since {why}: the weights stream to the GPU layer by "
                f"layer at every step (at most {size(needs['sequential'])}), many times slower, and {ram}; "
                "--offload model or none turns it off")
    return f"memory: the whole pipeline on {device} (--offload none)"


def idle_devices_note(args):
    """One process on a machine with several GPUs uses one of them: say which command uses them all."""
    if args.device == "cpu" or not torch.accelerator.is_available() or torch.accelerator.device_count() < 2:
        return
    devices, kind = torch.accelerator.device_count(), torch.accelerator.current_accelerator().type
    command = " ".join([f"uv run accelerate launch --multi_gpu --num_processes {devices} {Path(sys.argv[0]).name}",
                        *map(shlex.quote, sys.argv[1:])])
    print(f"note: this machine has {devices} {kind} devices and one process uses only one of them: `{command}` "
          "uses them all", file=sys.stderr, flush=True)


def image_names(prompts):
    """`007-a-red-fox-in-fresh-snow.png`: the prompt's index first, then a file-system-safe slug of its text."""
    width = max(3, len(str(len(prompts) - 1)))
    return [image_name(i, p, width) for i, p in enumerate(prompts)]


def image_name(index, prompt, width):
    slug = re.sub(r"\W+", "-", prompt.lower()).strip("-_")[:60].rstrip("-_") or "prompt"
    return f"{index:0{width}d}-{slug}.png"


def images_to_make(args, prompts, names):
    """The (index, prompt) pairs whose image is not in --output-dir yet (all of them with --overwrite)."""
    if args.output_dir.exists() and not args.output_dir.is_dir():
        fail(f"--output-dir {args.output_dir} is a file, not a folder")
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--output-dir {args.output_dir}: cannot create it ({e.strerror})")
    if not os.access(args.output_dir, os.W_OK):
        fail(f"--output-dir {args.output_dir} is not writable")
    for tmp in args.output_dir.glob(".*.tmp"):  # left by a process that was killed while writing
        tmp.unlink()
    done = set() if args.overwrite else {i for i, name in enumerate(names) if (args.output_dir / name).exists()}
    # Keep the manifest whole: drop the records of images that are gone or about to be made again, and rebuild
    # the line of an image whose process died between saving it and writing its line.
    manifest = args.output_dir / "manifest.jsonl"
    records = {i: r for i, r in read_manifest(manifest).items() if i in done and r.get("file") == names[i]}
    # An image made with other settings is not done for this command: say so rather than mix two runs.
    for i, r in records.items():
        asked = {"model": args.model, "seed": args.seed + i, "num_inference_steps": args.num_inference_steps,
                 "guidance_scale": args.guidance_scale, "width": args.width, "height": args.height,
                 "t5": not args.no_t5}  # SD3 with and without T5 make different pictures
        differ = [key for key, value in asked.items() if value is not None and key in r and r[key] != value]
        if differ:
            fail(f"{args.output_dir / r['file']} was made with another {', '.join(differ)}: add --overwrite to "
                 "make every image again, or choose another --output-dir")
    for i in done - records.keys():  # "rebuilt": what this command would have written, not a record of the run
        records[i] = {"index": i, "prompt": prompts[i], "file": names[i], "seed": args.seed + i, "rank": None,
                      "rebuilt": True}
    try:
        write_manifest(manifest, records)
        (args.output_dir / "summary.json").unlink(missing_ok=True)  # an earlier run's: this one writes its own
    except OSError as e:
        cannot_write(manifest, e)
    if done:
        print(f"{len(done)} of {len(prompts)} images are already in {args.output_dir}: making only the missing "
              "ones (--overwrite makes them all again)", flush=True)
    return [(i, prompts[i]) for i in range(len(prompts)) if i not in done]


def read_manifest(path):
    """The manifest's records by index; a line cut short by a crash is dropped (its image is made again)."""
    records = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                records[record["index"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    return records


def write_manifest(path, records):
    write_atomically(path, lambda tmp: tmp.write_text(
        "".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in sorted(records)), encoding="utf-8"))


class JobProgress:
    """One progress bar for the whole job, shown by the main process: the images in the manifest, to which every
    process (on every machine) appends a line per image. A thread reads it every second, so the bar moves while
    this process is busy generating, or waiting for the others."""

    def __init__(self, args, total, done):
        self.manifest = args.output_dir / "manifest.jsonl"
        tty = sys.stderr.isatty()  # in place on a terminal; in a log file, a line every 30 s
        self.bar = tqdm(total=total, initial=done, unit="image", desc="images", dynamic_ncols=True,
                        file=sys.stderr if tty else LogLines(sys.stderr), mininterval=0.5 if tty else 30)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self):
        while not self.stop.wait(1):
            self.bar.update(len(read_manifest(self.manifest)) - self.bar.n)

    def close(self, done):
        self.stop.set()
        self.thread.join()
        self.bar.update(done - self.bar.n)
        self.bar.close()


class LogLines:
    """tqdm redraws its bar in place with a carriage return; where that is a file, write each redraw as a line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        if text.strip():
            self.stream.write(text.replace("\r", "").rstrip() + "\n")

    def flush(self):
        self.stream.flush()


def load_on_this_device(args, distributed_state, device, sizes):
    """Every process loads the whole pipeline onto its own device: whole when it fits with room for the
    activations (the fastest), else with diffusers' CPU offload to THIS process's device (xpu:1 for rank 1, never
    device 0): the weights stay in this process's RAM and move to its GPU when they are needed. Returns the
    pipeline, the call's options and what the manifest records of the settings."""
    memory = memory_mode(args, device, sizes, announce=distributed_state.is_main_process)
    pipeline = load_pipeline(args, sizes)
    if memory == "whole":
        pipeline.to(device)
    elif memory == "model":  # each component goes to the GPU when it runs, and back when the next one starts
        pipeline.enable_model_cpu_offload(device=device)
    else:  # each layer's weights go to the GPU for its forward pass only: slow, and the least memory
        pipeline.enable_sequential_cpu_offload(device=device)
    no_fp64_remedy(pipeline, [device], announce=distributed_state.is_main_process)  # FLUX on Intel Arc A-series
    # Step bars from several processes would overwrite each other, and the job bar says more: --verbose.
    pipeline.set_progress_bar_config(disable=not (args.verbose and distributed_state.is_main_process))
    options = pipeline_options(args, pipeline)
    record = {"rank": distributed_state.process_index, "device": str(device), "model": args.model,
              "dtype": str(pipeline.dtype).removeprefix("torch."), **memory_record(pipeline, memory), **options}
    return pipeline, options, record


def memory_mode(args, device, sizes, announce):
    """How this process's device holds the pipeline: "whole", "model" or "sequential" (offload); say it once."""
    if device.type == "cpu":  # offload moves weights between RAM and a GPU: on the CPU there is nothing to move
        return "whole"
    plan = choose_memory_mode(sizes, free_memory(device), args.offload, sizes["ram"], sizes["processes"])
    mode = plan["mode"]
    if not plan["ram_fits"] and mode != "whole":  # not the kernel's out-of-memory killer, half-way through loading
        fail(f"{plan['processes']} processes offloading to their GPUs each keep a copy of the weights in system RAM: "
             f"{size(plan['ram_needed'])}, and {size(plan['ram_available'])} is free: run fewer processes on this "
             "machine (--num_processes), add --no-t5, or free some memory", code=1, every_process=True)
    if not plan["fits"] and args.offload == "auto":
        fail(f"{args.model} does not fit on {device} even layer by layer: that needs {size(plan['needs'][mode])} "
             f"free, it has {size(plan['device_memory'])}: make smaller images (--height/--width), add --no-t5, or "
             "use a GPU with more memory", code=1, every_process=True)
    if announce and (mode != "whole" or not plan["fits"]):
        print(describe_mode(args, plan, device), flush=True)
    return mode


def load_pipeline(args, sizes):
    dtype = getattr(torch, sizes["dtype"])  # weigh_pipeline's, which said why where it is not bfloat16
    # diffusers documents SD3 without T5: text_encoder_3=None, tokenizer_3=None (its prompt embeddings are zeros).
    without_t5 = {"text_encoder_3": None, "tokenizer_3": None} if args.no_t5 else {}
    with explained_load_errors(args.model):  # e.g. the configs came from the cache but the weights cannot be fetched
        return DiffusionPipeline.from_pretrained(args.model, dtype=dtype, **without_t5)


def pipeline_options(args, pipeline):
    """Steps and guidance as asked, or the pipeline's own defaults (28 and 7.0 for SD3, 28 and 3.5 for Flux)."""
    defaults = inspect.signature(pipeline.__call__).parameters
    return {name: value if value is not None else defaults[name].default for name, value in (
        ("num_inference_steps", args.num_inference_steps), ("guidance_scale", args.guidance_scale))}


def memory_record(pipeline, mode):
    """What the manifest says about memory: the mode, and for SD3 whether T5 read the prompts."""
    return {"memory": mode, **({"t5": pipeline.text_encoder_3 is not None} if "text_encoder_3" in pipeline.components
                               else {})}


def make_images(args, pipeline, options, record, my_share, names):
    """This process's share, --batch-size prompts a call; each image saved whole, with its manifest line, as soon
    as it is made. Returns how many were saved, and the seconds it took."""
    made, started = 0, time.perf_counter()
    for start in range(0, len(my_share), args.batch_size):
        batch = my_share[start:start + args.batch_size]
        # The picture of prompt i depends only on SEED + i: a CPU generator per prompt makes the same starting
        # noise on any device and in any batch, so 1 or N processes give the same images.
        generators = [torch.Generator("cpu").manual_seed(args.seed + i) for i, _ in batch]
        t0 = time.perf_counter()
        images = pipeline(prompt=[p for _, p in batch], generator=generators, height=args.height, width=args.width,
                          **options).images
        seconds = round((time.perf_counter() - t0) / len(batch), 3)
        for (i, prompt), image in zip(batch, images):
            save(args.output_dir, names[i], image,
                 {"index": i, "prompt": prompt, "seed": args.seed + i, "seconds": seconds, **record})
            made += 1  # saved whole, with its manifest line
    return made, time.perf_counter() - started


def save(folder, name, image, record):
    """Save one image whole, then its manifest line; a full disk (or any error writing) is one line, not a traceback."""
    try:
        write_atomically(folder / name, lambda tmp: image.save(tmp, format="PNG"))
    except OSError as e:
        cannot_write(folder / name, e)
    try:
        append_line(folder / "manifest.jsonl", {**record, "file": name, "width": image.width, "height": image.height})
    except OSError as e:
        cannot_write(folder / "manifest.jsonl", e)


def write_atomically(path, write):
    """Write to a temporary name in the same folder, then rename: a file on disk is always whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def append_line(path, record):
    """Append one manifest line in a single write: lines from several processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def cannot_write(path, error):
    """Stop on a write that failed (a full disk, most often): say where, what is saved, and how to go on."""
    folder = path if path.is_dir() else path.parent
    saved = len(list(folder.glob("[0-9]*-*.png")))
    fail(f"cannot write {path} ({error.strerror or error}): {saved} images are saved whole in {folder}; make room "
         "(or choose another --output-dir) and run the same command again to make the rest", code=1,
         every_process=True)


def wait_for_the_others(args, distributed_state, shares):
    """Wait until every process has saved its share (the manifest in --output-dir, which all processes share, has
    a line for each image saved), before the collective that gathers their numbers, which would wait a week. Give
    up when no image has been saved anywhere for --stall-timeout seconds and 10 times the slowest image: the first
    process still waiting names the silent ones in one line, and every waiting process exits, so that the launcher
    stops the rest."""
    owner = {i: rank for rank, share in enumerate(shares) for i in share}
    last, since = None, time.monotonic()
    while distributed_state.num_processes > 1:
        records = read_manifest(args.output_dir / "manifest.jsonl")
        made = {i for i in owner if i in records}  # images_to_make() dropped the lines of those to make again
        if len(made) == len(owner):
            return
        if len(made) != last:
            last, since = len(made), time.monotonic()
        slowest = max((records[i].get("seconds") or 0 for i in made), default=0)
        if time.monotonic() - since > max(args.stall_timeout, 10 * slowest):
            silent = sorted({owner[i] for i in owner if i not in made})
            if distributed_state.process_index == min(set(range(distributed_state.num_processes)) - set(silent)):
                fail(f"rank{'s' * (len(silent) > 1)} {', '.join(map(str, silent))} saved no image for "
                     f"{time.monotonic() - since:.0f} s ({len(made)} of {len(owner)} images made; the slowest "
                     f"took {slowest:.1f} s): stopping the job; run the same command again to make the rest "
                     "(--stall-timeout SECONDS waits longer)", code=1, every_process=True)
            time.sleep(1)  # the line above first
            sys.exit(1)
        time.sleep(0.25)


def finish(args, progress, stats, already, names):
    """The main process, once every process is done: the job's bar to its end, the manifest in prompt order (every
    process appended its lines as it went), the contact sheet, the report."""
    progress.close(done=already + sum(s["images"] for s in stats))
    try:
        manifest = args.output_dir / "manifest.jsonl"
        write_manifest(manifest, read_manifest(manifest))
        sheet = write_contact_sheet(args.output_dir, names)  # the run's images at a glance
        # Wall time since this process started, imports and loading included: what the user waited for.
        report(args, stats, already, time.time() - psutil.Process().create_time(), sheet)
    except OSError as e:
        cannot_write(args.output_dir, e)


def write_contact_sheet(folder, names):
    """A grid of thumbnails of the prompts' images, in prompt order (the first 64 of them): the run at a glance."""
    files = [folder / name for name in names if (folder / name).exists()][:SHEET_IMAGES]
    if not files:
        return None
    thumbnails = []
    for path in files:
        with Image.open(path) as image:
            image.thumbnail((THUMBNAIL, THUMBNAIL))  # shrinks only: small images keep every pixel
            thumbnails.append(image.convert("RGB"))
    cols = math.ceil(math.sqrt(len(thumbnails)))
    rows = math.ceil(len(thumbnails) / cols)
    blank = Image.new("RGB", thumbnails[0].size, "white")  # make_image_grid wants a full grid
    sheet = make_image_grid(thumbnails + [blank] * (rows * cols - len(thumbnails)), rows=rows, cols=cols)
    write_atomically(folder / CONTACT_SHEET, lambda tmp: sheet.save(tmp, format="PNG"))
    return folder / CONTACT_SHEET


def report(args, stats, already, wall_seconds, sheet):
    made = sum(s["images"] for s in stats)  # the images saved whole in this run, as each process counted them
    generate_seconds = max(s["generate_seconds"] for s in stats)
    print(f"\nmade {made} images ({already} already there) with {len(stats)} process(es) "
          f"in {wall_seconds:.1f} s: {made / wall_seconds:.2f} images/s overall, "
          f"{made / generate_seconds if generate_seconds else 0:.2f} images/s while generating")
    for s in stats:
        memory = f"peak RSS {s['peak_rss_gib']:.2f} GiB" + (
            f", peak device memory {s['peak_device_allocated_gib']:.2f} GiB allocated, "
            f"{s['peak_device_reserved_gib']:.2f} GiB reserved" if "peak_device_reserved_gib" in s else "")
        print(f"  rank {s['rank']} on {s['device']}: {s['images']} images in {s['generate_seconds']:.1f} s, {memory}")
    print(f"images and manifest.jsonl in {args.output_dir}/" + (f"; all at a glance in {sheet}" if sheet else ""))
    write_atomically(args.output_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(
        {"processes": len(stats), "images": made, "already_there": already, "wall_seconds": wall_seconds,
         "contact_sheet": sheet and sheet.name, "generate_seconds": generate_seconds, "ranks": stats}, indent=2)))


# --- The guards every script has, copied word for word: utils/check_copies.py keeps the copies identical ---


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


def end_process_group():
    """Leave the process group, if this process is in one, on every way out (a failure's too): left to the
    interpreter's exit, gloo now and then aborts the process ("terminate called without an active exception") and
    NCCL adds its own warning to the script's one line. Garbage goes first: a process group that only garbage
    still holds (a device mesh's, in a model already dropped) would otherwise be freed during the exit, with the
    same abort."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


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


def check_group_formed(distributed_state):
    """Several processes that formed no group would each do the whole job alone: stop instead."""
    if distributed_state.num_processes != int(os.environ.get("WORLD_SIZE", "1")):
        fail(f"the launcher started {os.environ['WORLD_SIZE']} processes but they formed no group, so each would "
             f"do the whole job alone: this torch ({torch.__version__}) has no torch.distributed; install one that "
             "has (PyPI's, or torch's XPU build for Intel GPUs)")


def quiet_libraries(main_process, verbose):
    """One copy of the libraries' warnings is enough (the main process's); their loading bars, which would cut
    through the script's own lines, show with --verbose."""
    for library in (diffusers, transformers):
        if not main_process:
            library.utils.logging.set_verbosity_error()
        if not (verbose and main_process):
            library.utils.logging.disable_progress_bar()


def process_device(distributed_state):
    """This process's device. In a CPU process group Accelerate says "cpu:0": moving the weights from "cpu" to
    "cpu:0" would copy every one of them, twice the memory for nothing."""
    device = distributed_state.device
    return torch.device("cpu") if device.type == "cpu" else device


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


def run_dtype(args):
    """The weights' dtype: as asked, or the GPU's (default_dtype), or float32 on the CPU."""
    on_gpu = args.device_memory is not None or (args.device != "cpu" and torch.accelerator.is_available())
    return getattr(torch, args.dtype) if args.dtype != "auto" else default_dtype(on_gpu, announce=not args.plan)


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


def no_fp64_remedy(pipeline, devices, announce=True):
    """FLUX builds its rotary position embedding in float64 on the device (diffusers' FluxPosEmbed; diffusers falls
    back to float32 on mps and npu only), and Intel's Arc A-series GPUs (A310 to A770, and the Arc graphics of Core
    Ultra "Meteor Lake" laptops) have no FP64: torch stops with "Required aspect fp64 is not supported on the
    device". Where a device of the run reports no FP64 and the transformer's rotary embedding asks for float64,
    compute that embedding on the CPU (a few hundred KB once a step: the same float64 numbers) and hand it to the
    device; elsewhere change nothing (QwenImage's, complex64, needs nothing). Returns those devices."""
    lacking = [torch.device(d) for d in devices if torch.device(d).type not in ("cpu", "meta") and not getattr(
        torch.get_device_module(torch.device(d)).get_device_properties(torch.device(d)), "has_fp64", True)]
    pos_embed = getattr(getattr(pipeline, "transformer", None), "pos_embed", None)
    if not lacking or pos_embed is None or not asks_for_float64(pos_embed):
        return []
    remove_hook_from_module(pos_embed)  # accelerate's hook would move its input back to the device first
    pipeline.transformer.pos_embed = OnTheCPU(pos_embed)
    if announce:
        print(f"note: {', '.join(map(str, lacking))} has no FP64 (Intel Arc A-series): FLUX's rotary position "
              "embedding, built in float64, is computed on the CPU", file=sys.stderr, flush=True)
    return lacking


def asks_for_float64(pos_embed):
    """Whether a rotary position embedding called as `pos_embed(ids)` (FLUX.1's, Flux2's, ...: ids of shape
    (tokens, axes)) computes in float64: run once on the CPU for one token, with every result's dtype watched. One
    called otherwise (QwenImage's `pos_embed(img_shapes, max_txt_seq_len=..., device=...)`) is not run."""
    if list(inspect.signature(type(pos_embed).forward).parameters) != ["self", "ids"]:
        return False
    dtypes = set()

    class WatchDtypes(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            dtypes.update(t.dtype for t in (result if isinstance(result, (tuple, list)) else [result])
                          if isinstance(t, torch.Tensor))
            return result

    with WatchDtypes(), torch.no_grad():
        type(pos_embed).forward(pos_embed, torch.zeros(1, len(getattr(pos_embed, "axes_dim", [0, 0, 0]))))
    return torch.float64 in dtypes


class OnTheCPU(torch.nn.Module):
    """Runs a module that holds no weights on the CPU, and hands its outputs to the device its input came from."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, ids):
        return tuple(output.to(ids.device) for output in self.module(ids.cpu()))


def peak_memory(device):
    """Peak resident memory of this process and, on a GPU, the peak memory it allocated and reserved there (GiB)."""
    if sys.platform == "win32":
        peak_rss = psutil.Process().memory_info().peak_wset
    else:
        import resource  # Unix only; ru_maxrss is in KiB on Linux, in bytes on macOS

        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    stats = {"peak_rss_gib": round(peak_rss / 2**30, 2)}
    if device.type != "cpu":
        allocated, reserved = gpu_memory(device, peak=True)
        stats |= {"peak_device_allocated_gib": round(allocated / 2**30, 2),
                  "peak_device_reserved_gib": round(reserved / 2**30, 2)}
    return stats


def gpu_memory(device, peak=False):
    """The memory of one GPU that this process holds (or its peak), in bytes: (allocated, reserved). Allocated is
    what torch's tensors hold; reserved is what torch's caching allocator holds from the GPU, allocated or not:
    what nvidia-smi and xpu-smi show for the process, less its context (a few hundred MB)."""
    if peak:
        return torch.accelerator.max_memory_allocated(device), torch.accelerator.max_memory_reserved(device)
    return torch.accelerator.memory_allocated(device), torch.accelerator.memory_reserved(device)


def size(b):
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:.1f} MiB"


if __name__ == "__main__":
    # A launcher stops the other processes with SIGTERM when one fails: exit through Python, so that
    # nothing is left half-written, instead of dying on the spot.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted: the images already made are kept; run the same command again to make the rest", 130)
    except torch.OutOfMemoryError:  # on the one process that ran out: say which, and what to try
        state = PartialState()
        fail(f"rank {state.process_index} ran out of memory on {state.device}: try a smaller --batch-size or "
             "--height/--width, --offload model (or sequential), or --no-t5 for SD3; --plan shows what fits",
             code=1, every_process=True)
    finally:  # every way out, fail() and SIGTERM included, leaves the process group first
        end_process_group()
