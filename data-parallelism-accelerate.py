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

Many images, each one sooner: with --context-parallel N (FLUX.1, QwenImage...) or --cfg-parallel (SD3.5) the
processes work in groups of N (of 2), laid out on a device mesh whose "data" dimension is the groups: each group
takes its share of the prompts, and its processes make each image together, splitting its tokens (context
parallelism) or its guidance batch (CFG parallelism). 8 GPUs in 4 groups of 2 make 4 images at a time, each
sooner than one GPU makes it (how much sooner, and what it costs: docs/data-parallelism.md):

    uv run torchrun --nproc-per-node 8 data-parallelism-accelerate.py --context-parallel 2 \
        --model black-forest-labs/FLUX.1-dev

Launcher options (--num_processes, --multi_gpu, ...) go *before* the script's name: what comes after it is
handed to the script. The images land in --output-dir as 000-<prompt>.png, 001-..., with metadata.jsonl, which
makes the folder a dataset (`datasets.load_dataset("imagefolder", data_dir=...)`). Running the same command again
makes only the images that are missing.

Each GPU must hold the pipeline: SD3.5-medium is 15.2 GiB in bfloat16, plus activations. Where it does not fit
whole (12 and 16 GB cards), each process uses diffusers' model CPU offload on its own GPU, and says so (groups
need the whole pipeline on each GPU); --plan tells beforehand, from the configs alone, which memory mode each
process will use and, with groups, which ranks make which prompts together.
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
import select
import shlex
import signal
import socket
import sys
import threading
import time
import unittest.mock
import warnings
from collections import Counter
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import diffusers
import psutil
import torch
import transformers
from accelerate import PartialState
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import broadcast_object_list, compute_module_sizes, convert_file_size_to_int, gather_object
from diffusers import AutoencoderKL, ContextParallelConfig, DiffusionPipeline
from diffusers.utils import make_image_grid
from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError
from PIL import Image
from torch.distributed.device_mesh import init_device_mesh
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
MANIFEST = "metadata.jsonl"  # a line per image: what datasets' "imagefolder" reads as the images' metadata
# Groups (--context-parallel, --cfg-parallel): pipelines whose text encoder keeps only the prompt's real tokens
# (QwenImage wraps it in a template of its own); the others pad it to the call's max_sequence_length (FLUX.1: 512).
TEMPLATED_PIPELINES = ("QwenImagePipeline",)

# diffusers imports transformers' image processors (for IP-Adapters, which this sample never uses), and without
# torchvision transformers warns about them in every process; diffusers 0.42's context parallel hooks
# (--context-parallel) call a torch collective that torch now calls deprecated, once per process. Silence those
# warnings alone; the others still show.
logging.getLogger("transformers.utils.import_utils").addFilter(lambda record: "torchvision" not in record.getMessage())
warnings.filterwarnings("ignore", message=r".*all_gather_tensor.* is deprecated", category=FutureWarning)


def main():
    args = parse_args()
    if not args.plan:  # a plan loads nothing and starts no processes: it may be for GPUs this machine lacks
        check_torch_can_use_the_gpus(args.device)  # never hours on the CPU, without a word, on a machine with GPUs
    prompts = read_prompts(args)
    check_model(args)  # fail now, not after every process has loaded 16 GB
    sizes = weigh_pipeline(args)  # from the configs alone (the meta device): what each GPU must hold, and the RAM
    layout = plan_the_layout(args, sizes, prompts)  # groups: the mesh, and whether its groups can split the model
    if args.plan:
        return print_plan(args, sizes, layout)
    check_launch(args)  # one process per device, and a torch that can join them into a group
    if layout["problems"]:  # groups the processes cannot form, or a model they cannot split: before any loading
        fail(layout["problems"][0])

    # 1. One process per device, in one group (form_the_group): Accelerate reads what the launcher set and picks
    #    this process's device (xpu:<local rank>, cuda:<local rank>); the group joins the GPUs with their own
    #    backend (xccl on Intel GPUs, nccl on NVIDIA) and the CPUs with gloo, and waits a week, not NCCL's 10
    #    minutes: a process that is done waits for the others (step 5).
    distributed_state, device = form_the_group(args)
    quiet_libraries(main_process=distributed_state.is_main_process, verbose=args.verbose)
    if distributed_state.num_processes == 1:
        idle_devices_note(args)  # one process on a machine of several GPUs: say how to use them all
    # With --context-parallel N or --cfg-parallel, the processes are laid out on a device mesh: its "data"
    # dimension is the groups (ranks 0..N-1 are group 0, N..2N-1 group 1, ...), its other dimensions the processes
    # of a group: ("data", "ring", "ulysses") as diffusers names context parallelism's, or ("data", "cfg").
    mesh = None
    if layout["group_size"] > 1:
        mesh = init_device_mesh(device.type, tuple(layout["mesh_shape"]), mesh_dim_names=tuple(layout["mesh_dims"]))
    group = group_of_this_process(distributed_state, mesh)

    # 2. The main process finds what is left to make (images already on disk are kept) and tells the others, so
    #    that every process splits the same list, even one that starts after another has saved images.
    names = image_names(prompts)
    todo = [images_to_make(args, prompts, names) if distributed_state.is_main_process else None]
    todo = broadcast_object_list(todo)[0]
    progress = JobProgress(args, len(prompts), len(prompts) - len(todo)) if distributed_state.is_main_process else None

    # 3. Split the prompts between the workers: the processes (split_between_processes) or, with groups, the
    #    groups, along the mesh's "data" dimension. With 10 prompts and 4 workers, workers 0 and 1 get 3 each,
    #    2 and 3 get 2 (contiguous slices, no padding: a worker whose share is shorter, or empty, makes fewer).
    my_share = share_of_the_prompts(distributed_state, group, todo)
    shares = gather_object([[i for i, _ in my_share]])  # every process's share, to name one that stops
    made, generate_seconds = 0, 0.0
    # An empty share loads nothing (an empty batch crashes the pipeline).
    pipeline, options, record = load_on_this_device(args, distributed_state, device, sizes, group) if (
        my_share) else (None, None, None)
    if mesh is not None:  # every process, one whose group has nothing to make too: these make collectives
        split_each_image_within_the_group(args, layout, mesh, device, pipeline)
    if my_share:
        # 4. Each worker makes its share, a batch at a time: prompt i's starting noise comes from SEED + i alone
        #    (a CPU generator), so 1 process, N, or N in groups make the same images; with groups every process of
        #    a group runs the same call, and the group's first process saves the image as it is made.
        made, generate_seconds = make_images(args, pipeline, options, record, my_share, names, group)

    # 5. Wait for the others, but not for one that has stopped (--stall-timeout); gather every process's numbers.
    wait_for_the_others(args, distributed_state, shares)
    stats = gather_object([{"rank": distributed_state.process_index, "ranks": group.ranks, "device": str(device),
                            "images": made, "generate_seconds": generate_seconds, **peak_memory(device)}])
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
                        help="where the images and their metadata.jsonl go (default: %(default)s)")
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
    parser.add_argument("--context-parallel", type=int, metavar="N",
                        help="groups of N processes make each image together, each process on 1/N of its tokens "
                             "(context parallelism: FLUX.1, QwenImage...); the groups share the prompts")
    parser.add_argument("--cfg-parallel", action="store_true",
                        help="groups of 2 processes make each image together, each on one half of the guidance "
                             "batch (CFG parallelism: SD3, SD3.5); the groups share the prompts")
    parser.add_argument("--plan", action="store_true",
                        help="load no weights, start no processes: print the memory mode each GPU would use (with "
                             "groups: which ranks make which prompts together)")
    parser.add_argument("--json", action="store_true", help="with --plan: print the plan as one JSON document")
    parser.add_argument("--device-memory", metavar="SIZE",
                        help="with --plan: plan for a GPU with SIZE free, e.g. 12GiB (default: the GPUs present)")
    parser.add_argument("--num-devices", type=int, metavar="N",
                        help="with --plan: plan for N processes, one per GPU (default: the GPUs present, or 1)")
    parser.add_argument("--stall-timeout", type=int, default=600, metavar="SECONDS",
                        help="a process that is done stops waiting for the others when no image has been saved for "
                             "this long and 10 times the slowest image: the job ends, naming the processes that "
                             "stopped; in a group, when no denoising step has finished for this long and 10 times "
                             "the slowest step (default: %(default)s)")
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
    for name in ("num_inference_steps", "height", "width", "batch_size", "stall_timeout", "context_parallel",
                 "num_devices"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be a positive number, not {getattr(args, name)}")
    if not args.plan and (args.json or args.device_memory or args.num_devices):
        fail("--json, --device-memory and --num-devices describe a plan: add --plan")
    if args.context_parallel and args.cfg_parallel:
        fail("--context-parallel and --cfg-parallel are two ways for a group to make each image together: choose "
             "one (--context-parallel for FLUX.1 and QwenImage, --cfg-parallel for SD3 and SD3.5)")
    if args.offload in ("model", "sequential") and (args.context_parallel or 1) * (2 if args.cfg_parallel else 1) > 1:
        fail(f"--offload {args.offload} with groups: the processes of a group exchange activations at every step, "
             "so each holds the whole pipeline on its GPU; on GPUs too small for it, leave out "
             f"{'--cfg-parallel' if args.cfg_parallel else '--context-parallel'} (each process then offloads, and "
             "makes its own images)")
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


def plan_the_layout(args, sizes, prompts):
    """The processes' layout: without groups, each process makes its own images; with --context-parallel N or
    --cfg-parallel, groups of N (of 2) make each image together. The device mesh they form, which ranks make which
    prompts together, how a group splits the model, and why these processes cannot form these groups or split
    this model (one line each, with what to do), all before anything is loaded."""
    if not args.plan:  # the processes the launcher started (a plain run is one)
        processes = int(os.environ.get("WORLD_SIZE", "1"))
    else:  # --num-devices, or one process per GPU present
        processes = args.num_devices or (torch.accelerator.device_count() if args.device != "cpu" and (
            torch.accelerator.is_available()) else 1)
    size = args.context_parallel or (2 if args.cfg_parallel else 1)
    parallel = None if size == 1 else "context" if args.context_parallel else "cfg"
    groups = max(1, processes // size)
    # Contiguous shares of the prompts, the first groups taking one more where they do not divide evenly.
    share, extra = divmod(len(prompts), groups)
    firsts = [g * share + min(g, extra) for g in range(groups + 1)]
    layout = {"processes": processes, "parallel": parallel, "group_size": size, "groups": groups,
              "mesh_dims": {"context": ["data", "ring", "ulysses"], "cfg": ["data", "cfg"]}.get(parallel, ["data"]),
              "mesh_shape": {"context": [groups, 1, size], "cfg": [groups, 2]}.get(parallel, [processes]),
              "shares": [{"ranks": list(range(g * size, (g + 1) * size)), "prompts": list(range(firsts[g],
                                                                                               firsts[g + 1]))}
                         for g in range(groups)] if size > 1 else None,
              "problems": []}
    if size == 1:
        return layout
    problems = layout["problems"]
    if processes % size:
        problems.append(f"{processes} process(es) cannot form groups of {size}: launch a multiple of {size}, e.g. "
                        f"`torchrun --nproc-per-node {max(size, processes // size * size)} {Path(sys.argv[0]).name} "
                        f"...`")
    here = int(os.environ.get("LOCAL_WORLD_SIZE", processes))  # this machine's processes (ranks in a row)
    if not args.plan and not processes % size and here % size:
        problems.append(f"groups of {size} would span machines: this one runs {here} processes, and the processes "
                        "of a group exchange activations at every step, over the link between one machine's GPUs: "
                        f"start a multiple of {size} processes on each machine")
    with warnings.catch_warnings(action="ignore"):
        index = DiffusionPipeline.load_config(args.model)
        transformer = AutoencoderKL.load_config(args.model, subfolder="transformer") if index.get("transformer") else {}
        vae = AutoencoderKL.load_config(args.model, subfolder="vae") if index.get("vae") else {}
    pipeline = index.get("_class_name")
    call = inspect.signature(getattr(diffusers, str(pipeline), DiffusionPipeline).__call__).parameters
    if parallel == "cfg":
        problems += guidance_problems(args, pipeline, call)
    else:
        layout |= context_split(args, sizes, prompts, index, transformer, vae, size, problems)
    return layout


def guidance_problems(args, pipeline, call):
    """--cfg-parallel: a StableDiffusion3Pipeline that does classifier-free guidance, whose batch its 2 can split."""
    if pipeline == "FluxPipeline":
        return [f"--cfg-parallel: --model {args.model} is a FLUX.1 pipeline, which does no classifier-free "
                "guidance (FLUX.1-dev is guidance-distilled: its transformer runs once a step, on the prompt alone): "
                "there is no guidance batch to split; --context-parallel 2 splits each image's tokens instead"]
    if pipeline != "StableDiffusion3Pipeline":
        return [f"--cfg-parallel splits StableDiffusion3Pipeline's guidance batch (SD3, SD3.5); --model {args.model} "
                f"is a {pipeline}: leave out --cfg-parallel (--context-parallel N serves FLUX.1, QwenImage...)"]
    scale = args.guidance_scale if args.guidance_scale is not None else call["guidance_scale"].default
    if scale <= 1:  # the pipeline's do_classifier_free_guidance is guidance_scale > 1
        return [f"--cfg-parallel with --guidance-scale {scale:g}: at 1 or below StableDiffusion3Pipeline does no "
                "classifier-free guidance (it runs the transformer once a step, on the prompt alone), so there is no "
                "guidance batch for a group's 2 processes to split: use a scale above 1, or leave out --cfg-parallel"]
    return []


def context_split(args, sizes, prompts, index, transformer, vae, size, problems):
    """--context-parallel N: how a group of N splits each image, as diffusers' Ulysses does (each process 1/N of the
    image tokens and of the prompt tokens, and in each attention 1/N of the heads), and the problems (appended)."""
    transformer_class = getattr(diffusers, index["transformer"][1], None) if index.get("transformer") else None
    # The model's context-parallel plan, a class attribute that enable_parallelism reads: read, not called.
    if getattr(transformer_class, "_cp_plan", None) is None:
        instead = ("--cfg-parallel splits its guidance batch instead" if index.get("_class_name") ==
                   "StableDiffusion3Pipeline" else "leave out --context-parallel")
        problems.append(f"--context-parallel: --model {args.model} is a {index.get('_class_name')}: diffusers cannot "
                        f"split its transformer ({(index.get('transformer') or [None, 'none'])[1]}) by context "
                        f"parallelism (it has no context-parallel plan): {instead}")
        return {}
    # An image token is a patch of 2x2 latents (FLUX.1 packs them; QwenImage too): 16x16 pixels behind an 8x VAE.
    patch = 2 * 2 ** (len(vae["temperal_downsample"]) if "temperal_downsample" in vae else
                      len(vae.get("block_out_channels", [0] * 4)) - 1)
    heads = transformer.get("num_attention_heads")
    image_tokens = (sizes["height"] // patch) * (sizes["width"] // patch)
    text_tokens = prompt_token_counts(args, index, prompts)
    if heads and not heads_can_be_padded(heads, size):
        works = [n for n in range(2, heads + 1) if heads_can_be_padded(heads, n)]
        problems.append(f"{heads} attention heads cannot be shared between the {size} processes of a group (Ulysses "
                        f"gives each heads/{size}, padded up to a whole number only with fewer padding heads than real "
                        f"ones each): use --context-parallel {', '.join(map(str, works[:8])) or '1'}")
    if image_tokens < size:
        problems.append(f"a {sizes['height']}x{sizes['width']} image is {image_tokens} tokens, fewer than the {size} "
                        "processes of a group that would share them: a larger image, or a smaller --context-parallel")
    if text_tokens and min(text_tokens) < size:
        shortest = prompts[text_tokens.index(min(text_tokens))]
        problems.append(f"the prompt {shortest!r} is {min(text_tokens)} tokens, fewer than the {size} processes of a "
                        "group that would share them: a longer prompt, or a smaller --context-parallel")
    # Where N does not divide the tokens or the heads, diffusers' ulysses_anything lets the shares differ by one
    # token and pads the heads; where the prompts' tokens are not known, it is on (it splits even shares alike).
    uneven = text_tokens is None or bool(image_tokens % size or (heads or 0) % size or any(t % size for t in
                                                                                              text_tokens))
    longest = max(text_tokens) if text_tokens else None
    return {"ring_degree": 1, "ulysses_degree": size, "ulysses_anything": uneven, "heads": heads,
            "heads_per_process": -(-heads // size) if heads else None, "image_tokens": image_tokens,
            "text_tokens": longest, "tokens_per_process": -(-image_tokens // size) - (-longest // size) if longest
            else None}


def prompt_token_counts(args, index, prompts):
    """Each prompt's tokens as the transformer gets them, which a group's processes split: FLUX.1's T5 pads the
    prompt to the call's max_sequence_length (512); QwenImage's pipeline wraps it in its template and keeps only
    the real tokens, counted here with its own tokenizer and template (the tokenizer alone is loaded, no weights).
    None for a pipeline that says neither."""
    if index.get("_class_name") not in TEMPLATED_PIPELINES:
        length = inspect.signature(getattr(diffusers, str(index.get("_class_name")), DiffusionPipeline).__call__
                                   ).parameters.get("max_sequence_length")
        return [length.default] * len(prompts) if length is not None and isinstance(length.default, int) else None
    weights = {name: None for name, spec in index.items() if isinstance(spec, list) and name != "tokenizer"}
    diffusers.utils.logging.disable_progress_bar()  # a bar for one tokenizer: no
    with explained_load_errors(args.model), warnings.catch_warnings(action="ignore"):
        tokenizer_only = DiffusionPipeline.from_pretrained(args.model, **weights)
    diffusers.utils.logging.enable_progress_bar()
    drop = tokenizer_only.prompt_template_encode_start_idx  # the pipeline's _get_qwen_prompt_embeds, counted
    limit = inspect.signature(type(tokenizer_only).__call__).parameters["max_sequence_length"].default
    return [min(len(tokenizer_only.tokenizer(tokenizer_only.prompt_template_encode.format(prompt), truncation=True,
                                             max_length=tokenizer_only.tokenizer_max_length + drop).input_ids) - drop,
                limit) for prompt in prompts]


def print_plan(args, sizes, layout):
    """--plan: the memory mode for the GPUs present (the one with the least free memory) or for --device-memory;
    with groups, the layout: which ranks make which prompts together, and how each image is split between them."""
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
    groups = layout["group_size"] > 1  # a group's processes each hold the whole pipeline: no offload
    plan = choose_memory_mode(sizes, device_memory, "none" if groups else args.offload, ram, processes)
    if device == "cpu":  # no offload without an accelerator: the pipeline is used whole, in RAM
        plan["fits"] = plan["needs"]["whole"] <= device_memory
        plan["mode"] = "whole"
    plan |= {"device": device, "dtype": sizes["dtype"], "height": sizes["height"], "width": sizes["width"],
             "batch_size": args.batch_size, "components": sizes["components"], "t5": not args.no_t5,
             "layout": layout, "fits": plan["fits"] and not layout["problems"]}
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
        if groups and mode != "whole":
            continue
        offloaded = "" if mode == "whole" else f", and {size(plan['ram_needed'])} of system RAM"
        print(f"  {names[mode]:<23} needs {size(need):>10} on the GPU{offloaded}: "
              f"{'fits' if need <= device_memory else 'does not fit'}" + (
                  " (each GPU of a group holds the whole pipeline)" if groups else ""))
    if device != "cpu" and ram is not None and not plan["ram_fits"] and not groups:
        print(f"  system RAM: {size(plan['ram_needed'])} for {plan['processes']} process(es) offloading, "
              f"{size(ram)} free: offloading does not fit")
    if device == "cpu":
        print(f"  no GPU here: the pipeline runs whole on the CPU, and needs {size(plan['needs']['whole'])} of RAM "
              "(--device-memory SIZE plans for a GPU)")
    if groups:
        print_the_layout(layout)
        if device != "cpu" and plan["needs"]["whole"] > device_memory:
            flag = "--cfg-parallel" if args.cfg_parallel else "--context-parallel"
            print(f"  NO: each GPU of a group holds the whole pipeline; without {flag}, each process offloads")
    print(f"  mode: {plan['mode']}, fits: {'yes' if plan['fits'] else 'NO'}")


def print_the_layout(layout):
    """The plan's lines about groups: the mesh, how each image is split, and which ranks make which prompts."""
    mesh = " x ".join(f"{name} {n}" for name, n in zip(layout["mesh_dims"], layout["mesh_shape"]))
    print(f"  layout: {layout['processes']} process(es) in {layout['groups']} group(s) of {layout['group_size']} "
          f"(mesh {mesh}), each image made by one group:")
    if layout["parallel"] == "cfg":
        print("    split: the guidance batch of 2 (negative prompt, prompt), 1 per process; one all-gather a step")
    elif layout.get("image_tokens"):
        up_to = "up to " if layout["ulysses_anything"] else ""
        text = (f"{layout['text_tokens']} prompt tokens" if layout["text_tokens"] else "the prompt's tokens")
        per = f", {up_to}{layout['tokens_per_process']} per process" if layout["tokens_per_process"] else ""
        print(f"    split: {layout['image_tokens']} image tokens + {text}{per}; {layout['heads']} heads, "
              f"{up_to}{layout['heads_per_process']} per process" + (" (uneven: ulysses_anything)" if up_to else ""))
    for share in layout["shares"]:
        prompts = share["prompts"]
        which = (f"prompts {prompts[0]}-{prompts[-1]}" if len(prompts) > 1 else f"prompt {prompts[0]}" if prompts
                 else "nothing")
        print(f"    ranks {', '.join(map(str, share['ranks']))} make {which} together ({len(prompts)} image(s))")
    for problem in layout["problems"]:
        print(f"  NO: {problem}")


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


def group_of_this_process(distributed_state, mesh):
    """This process's worker: its group's ranks (with no mesh, this process alone), the worker's number along the
    mesh's "data" dimension and how many workers there are, and the processes' ids (to watch a group's others)."""
    rank = distributed_state.process_index
    if mesh is None:
        return SimpleNamespace(rank=rank, ranks=[rank], worker=rank, workers=distributed_state.num_processes)
    pids = gather_object([os.getpid()])  # every process's, in rank order: a group's are on one machine
    ranks = mesh[mesh.mesh_dim_names[1:]].mesh.flatten().tolist()  # the group: the mesh's dimensions but "data"
    return SimpleNamespace(rank=rank, ranks=ranks, worker=mesh.get_local_rank("data"), workers=mesh.size(0),
                           pids=[pids[r] for r in ranks])


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
    manifest = args.output_dir / MANIFEST
    earlier = args.output_dir / "manifest.jsonl"  # what this script wrote before the folder was a dataset
    if earlier.exists() and not manifest.exists():  # its records, "file" renamed: checked below like the others
        write_manifest(manifest, {i: {"file_name" if key == "file" else key: value for key, value in r.items()}
                                  for i, r in read_manifest(earlier).items()})
        earlier.unlink()
    records = {i: r for i, r in read_manifest(manifest).items() if i in done and r.get("file_name") == names[i]}
    # An image made with other settings is not done for this command: say so rather than mix two runs.
    for i, r in records.items():
        asked = {"model": args.model, "seed": args.seed + i, "num_inference_steps": args.num_inference_steps,
                 "guidance_scale": args.guidance_scale, "width": args.width, "height": args.height,
                 "t5": not args.no_t5}  # SD3 with and without T5 make different pictures
        differ = [key for key, value in asked.items() if value is not None and key in r and r[key] != value]
        if differ:
            fail(f"{args.output_dir / r['file_name']} was made with another {', '.join(differ)}: add --overwrite to "
                 "make every image again, or choose another --output-dir")
    for i in done - records.keys():  # "rebuilt": what this command would have written, not a record of the run
        records[i] = {"index": i, "prompt": prompts[i], "file_name": names[i], "seed": args.seed + i, "rank": None,
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
        self.manifest = args.output_dir / MANIFEST
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


def share_of_the_prompts(distributed_state, group, todo):
    """This process's share of `todo`: Accelerate's split_between_processes, over every process; with groups, the
    same contiguous split over the groups (the mesh's "data" dimension), which every process of a group gets."""
    if len(group.ranks) == 1:
        with distributed_state.split_between_processes(todo) as my_share:
            return my_share
    share, extra = divmod(len(todo), group.workers)
    first = group.worker * share + min(group.worker, extra)
    return todo[first:first + share + (group.worker < extra)]


def load_on_this_device(args, distributed_state, device, sizes, group):
    """Every process loads the whole pipeline onto its own device: whole when it fits with room for the
    activations (the fastest), else with diffusers' CPU offload to THIS process's device (xpu:1 for rank 1, never
    device 0): the weights stay in this process's RAM and move to its GPU when they are needed (not in a group,
    whose processes exchange activations at every step). Returns the pipeline, the call's options and what the
    manifest records of the settings and of the processes that make each image (`ranks`: its group's)."""
    memory = memory_mode(args, device, sizes, announce=distributed_state.is_main_process, groups=len(group.ranks) > 1)
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
    record = {"rank": distributed_state.process_index, "ranks": group.ranks, "device": str(device), "model": args.model,
              "dtype": str(pipeline.dtype).removeprefix("torch."), **memory_record(pipeline, memory), **options}
    return pipeline, options, record


def split_each_image_within_the_group(args, layout, mesh, device, pipeline):
    """Groups: every process of the job, one with nothing to make too (no pipeline). CFG parallelism: hooks on the
    transformer, the gather and the half chosen within this process's group of 2 (the mesh's "cfg" dimension).
    Context parallelism: diffusers splits the transformer's sequence between the processes of this process's group
    (the mesh's "ring" x "ulysses" sub-mesh), and in doing so makes new process groups, a collective of every
    process: a process whose group has nothing to make (a resume with fewer images left than groups) makes it on
    the transformer built without weights (the meta device), and loads nothing."""
    # Every process has loaded: from here on the group's collectives, whose timeout is torch's default (30 minutes:
    # the mesh's groups, diffusers'), wait for steps, not for a process still loading.
    wait_for_everyone(device)
    if layout["parallel"] == "cfg":
        if pipeline is not None:
            split_the_guidance_batch(pipeline.transformer, mesh.get_group("cfg"))
        return
    enable_context_parallelism(pipeline or SimpleNamespace(transformer=weightless_transformer(args.model)), layout,
                               mesh["ring", "ulysses"])


def weightless_transformer(model):
    """The pipeline's transformer built from its config on the meta device: its modules, no weights."""
    name = DiffusionPipeline.load_config(model)["transformer"][1]
    cls = getattr(diffusers, name)
    with warnings.catch_warnings(action="ignore"), torch.device("meta"):
        return cls.from_config(cls.load_config(model, subfolder="transformer"))


def memory_mode(args, device, sizes, announce, groups=False):
    """How this process's device holds the pipeline: "whole", "model" or "sequential" (offload); say it once. In a
    group, whole or not at all."""
    if device.type == "cpu":  # offload moves weights between RAM and a GPU: on the CPU there is nothing to move
        return "whole"
    plan = choose_memory_mode(sizes, free_memory(device), "none" if groups else args.offload, sizes["ram"],
                              sizes["processes"])
    mode = plan["mode"]
    if groups and not plan["fits"] and args.offload == "auto":
        fail(f"{args.model} does not fit whole on {device}, and each GPU of a group holds the whole pipeline: it needs "
             f"{size(plan['needs']['whole'])}, {device} has {size(plan['device_memory'])} free: leave out "
             f"{'--cfg-parallel' if args.cfg_parallel else '--context-parallel'} (each process then offloads, and "
             "makes its own images), or make smaller images (--height/--width)", code=1, every_process=True)
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


def make_images(args, pipeline, options, record, my_share, names, group):
    """This worker's share, --batch-size prompts a call; each image saved whole, with its manifest line, as soon
    as it is made: by this process, or in a group by the group's first process (the others made it too). Returns
    how many images this process made, and the seconds it took."""
    made, started = 0, time.perf_counter()
    in_a_group = len(group.ranks) > 1
    watch = watch_the_group(group) if in_a_group else None  # a process of the group killed: one line
    # A process of the group that stops without ending (a GPU or driver that no longer answers) would keep the others
    # waiting in the group's next collective for its timeout, with a traceback: end the job after --stall-timeout.
    stall = StallWatchdog(args.stall_timeout, group.rank == group.ranks[0], options["num_inference_steps"] * len(
        my_share)) if in_a_group else None
    for start in range(0, len(my_share), args.batch_size):
        batch = my_share[start:start + args.batch_size]
        # The picture of prompt i depends only on SEED + i: a CPU generator per prompt makes the same starting
        # noise on any device and in any batch, so 1 or N processes give the same images.
        generators = [torch.Generator("cpu").manual_seed(args.seed + i) for i, _ in batch]
        t0 = time.perf_counter()
        try:
            images = pipeline(prompt=[p for _, p in batch], generator=generators, height=args.height,
                              width=args.width, callback_on_step_end=stall and (lambda *step: stall.beat() or {}),
                              **options).images
        except RuntimeError:  # a collective of the group failed: gloo's, when a process of the group has ended
            if watch is None or not watch.has_seen_the_end():
                raise
            sys.exit(1)  # that process said why (or, if it was killed, the watch said it), or the job is ending
        seconds = round((time.perf_counter() - t0) / len(batch), 3)
        for (i, prompt), image in zip(batch, images):
            if record["rank"] == group.ranks[0]:
                save(args.output_dir, names[i], image,
                     {"index": i, "prompt": prompt, "seed": args.seed + i, "seconds": seconds, **record})
            made += 1  # saved whole, with its manifest line
    for watcher in (watch, stall):
        if watcher is not None:
            watcher.close()
    return made, time.perf_counter() - started


def watch_the_group(group):
    """A GroupWatch of this process's group, where Linux lets a process watch others (pidfd: kernel 5.3 and newer, a
    container whose seccomp profile allows it); elsewhere None, and the launcher's report names a process killed."""
    try:
        return GroupWatch(group)
    except (AttributeError, OSError):
        return None


class GroupWatch:
    """While a group makes its images, a thread of each of its processes watches the others of the group (Linux's
    pidfd: a file that becomes readable when its process ends). One that is killed (the kernel's out-of-memory
    killer, a crash) would leave the others waiting in the group's next collective: gloo fails with a traceback,
    NCCL and XCCL wait for the group's timeout. Then the first process left of the group says so in one line, and
    the group's processes exit; the launcher stops the rest. A process that ended by itself has said why (its own
    line, or a traceback), and a signal that reached this process first means that the launcher (or Ctrl-C) is
    ending the job: then the group's processes exit without a word."""

    def __init__(self, group):
        self.rank, self.ranks = group.rank, group.ranks
        self.others = {}
        try:
            for rank, pid in zip(group.ranks, group.pids):
                if rank != group.rank:
                    self.others[os.pidfd_open(pid)] = (rank, pid)
        except OSError:
            for fd in self.others:
                os.close(fd)
            raise
        # A byte for each signal this process gets, written as it arrives (whatever its main thread is doing).
        self.signals, self.signalled = os.pipe()
        os.set_blocking(self.signalled, False)
        signal.set_wakeup_fd(self.signalled, warn_on_full_buffer=False)
        self.done, self.closing = os.pipe()
        self.thread = threading.Thread(target=self.watch, name="group-watch", daemon=True)
        self.thread.start()

    def watch(self):
        poll = select.poll()  # any file number (select.select takes none above 1023)
        for fd in [self.done, self.signals, *self.others]:
            poll.register(fd, select.POLLIN)
        ready = {fd for fd, _ in poll.poll()}
        if self.done in ready or self.signals in ready:  # done, or the job is ending anyway
            return
        ended = {self.others[fd][0]: killed_by(self.others[fd][1]) for fd in ready}
        left = [rank for rank in self.ranks if rank not in ended]
        unsaid = {rank: by for rank, by in ended.items() if by != 0}  # killed, or reaped before it could be read
        if unsaid and self.rank == min(left):
            how = (f"was killed ({', '.join(signal.Signals(by).name for by in unsaid.values())})"
                   if all(unsaid.values()) else "ended (the launcher's report says how)")
            print(f"\nerror: {' and '.join(f'rank {rank}' for rank in unsaid)} of the group of ranks "
                  f"{', '.join(map(str, self.ranks))} {how} while the group was making an image: ending the job; the "
                  "images saved are whole: run the same command again to make the rest", file=sys.stderr, flush=True)
        os._exit(1)  # the main thread may be waiting in a collective that never ends

    def has_seen_the_end(self):
        """After a collective of the group failed: whether the watch has seen a process of the group end, or a
        signal that ends the job (a moment for it to see that first; it exits the process itself if a process of
        the group ended)."""
        self.thread.join(timeout=10)
        return not self.thread.is_alive()

    def close(self):
        os.write(self.closing, b"x")
        self.thread.join()
        signal.set_wakeup_fd(-1)
        for fd in [self.signals, self.signalled, self.done, self.closing, *self.others]:
            os.close(fd)


def killed_by(pid):
    """The signal that ended process `pid`, from its exit code in /proc/<pid>/stat: 0 where it exited by itself,
    None where its launcher reaped it before it could be read (the file is there until then)."""
    try:
        status = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[49])
    except (OSError, IndexError, ValueError):
        return None
    return status & 0x7F


def save(folder, name, image, record):
    """Save one image whole, then its manifest line; a full disk (or any error writing) is one line, not a traceback."""
    try:
        write_atomically(folder / name, lambda tmp: image.save(tmp, format="PNG"))
    except OSError as e:
        cannot_write(folder / name, e)
    try:
        append_line(folder / MANIFEST, {**record, "file_name": name, "width": image.width, "height": image.height})
    except OSError as e:
        cannot_write(folder / MANIFEST, e)


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
    stops the rest. A group's processes share its share: all of them are named."""
    owner = {i for share in shares for i in share}
    last, since = None, time.monotonic()
    while distributed_state.num_processes > 1:
        records = read_manifest(args.output_dir / MANIFEST)
        made = {i for i in owner if i in records}  # images_to_make() dropped the lines of those to make again
        if len(made) == len(owner):
            return
        if len(made) != last:
            last, since = len(made), time.monotonic()
        slowest = max((records[i].get("seconds") or 0 for i in made), default=0)
        if time.monotonic() - since > max(args.stall_timeout, 10 * slowest):
            silent = sorted({rank for rank, share in enumerate(shares) for i in share if i not in made})
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
    progress.close(done=already + sum(s["images"] for s in stats if s["rank"] == s["ranks"][0]))
    try:
        manifest = args.output_dir / MANIFEST
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
    # The images saved whole in this run, as each process (each group's first, in a group) counted them.
    made = sum(s["images"] for s in stats if s["rank"] == s["ranks"][0])
    generate_seconds = max(s["generate_seconds"] for s in stats)
    group_size = len(stats[0]["ranks"])
    groups = f" in {len(stats) // group_size} groups of {group_size}" if group_size > 1 else ""
    print(f"\nmade {made} images ({already} already there) with {len(stats)} process(es){groups} "
          f"in {wall_seconds:.1f} s: {made / wall_seconds:.2f} images/s overall, "
          f"{made / generate_seconds if generate_seconds else 0:.2f} images/s while generating")
    for s in stats:
        memory = f"peak RSS {s['peak_rss_gib']:.2f} GiB" + (
            f", peak device memory {s['peak_device_allocated_gib']:.2f} GiB allocated, "
            f"{s['peak_device_reserved_gib']:.2f} GiB reserved" if "peak_device_reserved_gib" in s else "")
        together = f" with ranks {', '.join(map(str, s['ranks']))}" if len(s["ranks"]) > 1 else ""
        print(f"  rank {s['rank']} on {s['device']}: {s['images']} images{together} in {s['generate_seconds']:.1f} s, "
              f"{memory}")
    print(f"images and {MANIFEST} in {args.output_dir}/" + (f"; all at a glance in {sheet}" if sheet else ""))
    write_atomically(args.output_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(
        {"processes": len(stats), "group_size": group_size, "images": made, "already_there": already,
         "wall_seconds": wall_seconds,
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


# Copied from context-parallelism-flux.py::wait_for_everyone
def wait_for_everyone(device):
    """Wait until every process of the group is here (a barrier), on this process's own device. Accelerate's
    wait_for_everyone names the device of the local rank (cuda:1 for local rank 1) wherever torch can use a GPU:
    not the device of a process whose GPU a mask renumbered (each process sees its one GPU as device 0), and a GPU
    for processes on the CPU too (--device cpu on a machine with GPUs). On the CPU this names none: torch then
    takes the group's CPU backend, gloo."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier(device_ids=None if device.type == "cpu" else [device.index])


# Copied from context-parallelism-flux.py::enable_context_parallelism
def enable_context_parallelism(pipeline, plan, mesh):
    """Split the transformer's sequence between the processes of `mesh` (its dimensions named "ring" and "ulysses",
    as diffusers wants them: the whole mesh, or the sub-mesh of a group in a larger one). Its hooks (the model's own
    plan) hand each process 1/N of the image tokens and 1/N of the prompt tokens as they enter the transformer, and
    gather the N pieces of the output after its last layer. In every attention, Ulysses swaps the pieces with
    all-to-alls (the query, key and value on the way in, the output on the way out), so that each process holds
    every token for 1/N of the heads, attends, and swaps back; ring attention (--ring-degree) instead passes the
    keys and values around. Where N does not divide the tokens or the heads, ulysses_anything lets the shares
    differ by one token, and pads the heads."""
    config = ContextParallelConfig(ring_degree=plan["ring_degree"], ulysses_degree=plan["ulysses_degree"],
                                   ulysses_anything=plan["ulysses_anything"], mesh=mesh)
    # diffusers 0.42 picks the process's device as `rank % torch.accelerator.device_count()`
    # (diffusers/models/modeling_utils.py, ModelMixin._resolve_parallel_config): a division by zero where
    # there is no accelerator. There, and only there, count the CPU as one device while it does.
    with (unittest.mock.patch("torch.accelerator.device_count", return_value=1)
          if not torch.accelerator.is_available() else contextlib.nullcontext()):
        pipeline.transformer.enable_parallelism(config=config)
    if mesh.device_type == "cpu" and plan["ulysses_anything"]:  # gloo: see all_gather_of_any_sizes
        torch.distributed.all_gather = all_gather_of_any_sizes(torch.distributed.all_gather)


# Copied from context-parallelism-flux.py::all_gather_of_any_sizes
def all_gather_of_any_sizes(all_gather):
    """torch.distributed.all_gather, for a gloo group too where the pieces differ in size. ulysses_anything gathers
    the transformer's output from pieces of unequal length (diffusers/hooks/context_parallel.py,
    _all_gather_anything, with dist.all_gather): nccl and xccl gather those as they are, gloo refuses them
    ("ProcessGroupGloo::allgather: invalid tensor size"). Here each piece is padded to the longest, gathered, and
    cut back to its own length."""
    def gather(tensor_list, tensor, group=None, async_op=False):
        if async_op or all(t.shape == tensor.shape for t in tensor_list):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        dim = next(d for d in range(tensor.dim()) if len({t.shape[d] for t in [tensor, *tensor_list]}) > 1)
        shape = list(tensor.shape)
        shape[dim] = max(t.shape[dim] for t in tensor_list)
        padded = tensor.new_zeros(shape)
        padded.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
        pieces = [tensor.new_empty(shape) for _ in tensor_list]
        all_gather(pieces, padded, group=group)
        for out, piece in zip(tensor_list, pieces):
            out.copy_(piece.narrow(dim, 0, out.shape[dim]))
    return gather


# Copied from context-parallelism-flux.py::heads_can_be_padded
def heads_can_be_padded(heads, n):
    """Whether Ulysses anything can share `heads` between `n` processes: diffusers pads them to a multiple of n
    only where the padding is less than the heads each process gets (_maybe_pad_qkv_head)."""
    return heads % n == 0 or n - heads % n < -(-heads // n)


# Copied from cfg-parallelism-sd3.py::split_the_guidance_batch
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


# Copied from cfg-parallelism-sd3.py::is_the_guidance_batch
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
        fail("interrupted: the images already made are kept; run the same command again to make the rest", 130)
    except torch.OutOfMemoryError:  # on the one process that ran out: say which, and what to try
        state = PartialState()
        fail(f"rank {state.process_index} ran out of memory on {state.device}: try a smaller --batch-size or "
             "--height/--width, --offload model (or sequential), or --no-t5 for SD3; --plan shows what fits",
             code=1, every_process=True)
    finally:  # every way out, fail() and SIGTERM included, leaves the process group first
        end_process_group()
