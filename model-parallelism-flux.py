# SPDX-License-Identifier: MIT
# Follows diffusers' distributed inference guide (model sharding):
#   https://huggingface.co/docs/diffusers/training/distributed_inference
"""Model parallelism (sharding): one FLUX.1 pipeline spread over several devices, for a model that fits on none.

FLUX.1-dev in bfloat16 is 31.4 GiB as loaded: transformer 22.2 GiB, T5-XXL text encoder 8.9 GiB, CLIP-L 0.23 GiB,
VAE 0.16 GiB. The libraries place it, as in diffusers' distributed inference guide; the script only tells them how much
memory each device may give:

1. `DiffusionPipeline.from_pretrained(..., device_map="balanced", max_memory=...)` puts *whole components* on the
   devices, largest first, each on the next device in turn. When every component fits that way, that is all.
2. A component that fits on no device whole (the transformer on 16-24 GB cards, T5 too on 12 GB cards) is split
   between its blocks by Accelerate's `infer_auto_device_map`, each device filled up to an equal share of the
   pipeline, loaded on its own by `AutoModel.from_pretrained(subfolder=..., device_map=...)` and handed to the
   pipeline, which places the rest.
3. With --staged, the text encoders alone encode the prompt and are freed; then the transformer and the VAE make the
   image. This is what fits FLUX.1-dev on two 16 GB cards.

    uv run model-parallelism-flux.py                                      # every GPU (Intel or NVIDIA) present
    uv run model-parallelism-flux.py --staged                             # text encoders first, then the rest
    uv run model-parallelism-flux.py --plan --num-devices 2 --device-memory 16GiB   # will it fit? no download
    uv run model-parallelism-flux.py --model tiny/flux --height 64 --width 64 --num-inference-steps 2  # CPU

--plan makes the same placement with the same calls on the model built on the meta device from its configs (a few
kilobytes, no weights), at the dtype asked (with the weights the libraries keep in float32), and loads nothing.
Each device keeps 3 GiB free for activations at 1024x1024 (scaled with the pixel count): the VAE decoding the
full-size image and one transformer block working on 4096 image + 512 text tokens each need 1-3 GiB.
"""

import argparse
import contextlib
import importlib
import inspect
import json
import logging
import os
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import accelerate
import diffusers
import huggingface_hub
import psutil
import torch
import transformers
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import compute_module_sizes, convert_file_size_to_int, get_max_memory
from accelerate.utils.memory import clear_device_cache
from diffusers import AutoencoderKL, AutoModel, DiffusionPipeline
from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"
DEFAULT_PROMPT = "A cat holding a sign that says hello world"
GiB = 2**30
RESERVE_AT_1024 = 3 * GiB  # activations kept free on each device at 1024x1024, scaled with the pixel count
TEXT_STAGE, IMAGE_STAGE = ("text_encoder", "text_encoder_2"), ("transformer", "vae")

# diffusers imports transformers' image processors (for IP-Adapters, which this sample never uses), and without
# torchvision transformers warns about them; and to place the components, diffusers casts empty models, warning
# that they keep no modules in float32 ("[]"). Silence those warnings alone; the others still show.
logging.getLogger("transformers.utils.import_utils").addFilter(lambda record: "torchvision" not in record.getMessage())
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    lambda record: "should be kept in float32: []" not in record.getMessage())


def main():
    args = parse_args()
    if not args.plan:  # a plan loads nothing: it may be for GPUs this machine does not have
        check_torch_can_use_the_gpus(args.device)  # never hours on the CPU, without a word, on a machine with GPUs
    components = check_flux_model(args)
    on_gpu = args.planned or (args.device != "cpu" and torch.accelerator.is_available())
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else default_dtype(on_gpu, announce=True)

    # 1. Plan: how much each device may hold, and where each component (or each block of one too big for any
    #    device) goes, computed by the calls the load makes, on the model built on the meta device.
    plan = make_plan(args, components, device_memory(args), dtype)
    print_plan(args, plan)  # with --json, as one JSON document
    if args.plan:
        return
    check_fits(args, plan)

    # 2. Load, one stage at a time: the whole pipeline, or with --staged the text encoders and then the rest.
    inputs, started = dict(prompt=args.prompt), time.perf_counter()
    for stage in plan["stages"]:
        with explained_load_errors(args.model):
            # A component that fits on no device whole: the model's own from_pretrained loads it split between its
            # blocks, each on the device accelerate's infer_auto_device_map chose for it in the plan...
            split = {name: AutoModel.from_pretrained(args.model, subfolder=name, device_map=stage["device_maps"][name],
                                                     dtype=dtype) for name in stage["split"]}
            hook_the_unsplit(split, stage)
            # ...and hands it to the pipeline, which puts every other component whole on a device: "balanced" takes
            # them largest first, each to the next device in turn. Accelerate's hooks then move the activations from
            # device to device as the pipeline runs: the devices take turns on one image, they do not work at once.
            pipeline = DiffusionPipeline.from_pretrained(args.model, device_map="balanced",
                                                         max_memory=stage["max_memory"], dtype=dtype, **split,
                                                         **left_out(stage["names"]))
        devices = show_the_stage(pipeline, split, stage, started)
        if stage["names"] == TEXT_STAGE:  # --staged: the text encoders make the prompt embeddings, and are freed
            inputs = encode_prompt(args, pipeline)
            pipeline.remove_all_hooks()  # drop every reference to their weights, split ones too, and free them
            del pipeline, split
            clear_device_cache(garbage_collection=True)

    # 3. Generate one image, timing each step, then save it and report the peak memory of every device. The
    #    starting noise comes from a CPU generator: the same seed gives the same image on any device.
    reset_peak_memory(devices)
    step_times, t0 = [], time.perf_counter()
    image = pipeline(**inputs, height=args.height, width=args.width, num_inference_steps=args.num_inference_steps,
                     guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length,
                     generator=torch.Generator("cpu").manual_seed(args.seed),
                     callback_on_step_end=lambda *a: step_times.append(time.perf_counter()) or {}).images[0]
    seconds = time.perf_counter() - t0
    save(image, args.output)
    report(args, image, seconds, step_times, t0, devices)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Hub id or local folder of a FLUX.1 pipeline (default: %(default)s)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="what to draw (default: %(default)r)")
    parser.add_argument("--height", type=int, default=1024, help="image height in pixels (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1024, help="image width in pixels (default: %(default)s)")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    parser.add_argument("--guidance-scale", type=float, default=3.5, help="guidance (default: %(default)s)")
    parser.add_argument("--max-sequence-length", type=int, default=512,
                        help="T5 prompt tokens, at most 512 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("flux-dev.png"), help="the image (default: %(default)s)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="weights' dtype; auto is bfloat16 on GPUs (float16 on NVIDIA GPUs before Ampere) and "
                             "float32 on the CPU (default: %(default)s)")
    parser.add_argument("--max-memory", metavar="SIZE|DEV=SIZE,...",
                        help="memory to use: one size for every device (16GiB), or per device (0=10GiB,1=16GiB; the "
                             "devices not named keep their free memory); cpu=SIZE adds the CPU for what the devices "
                             "cannot hold (slow) (default: the free memory of every device)")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: the GPUs where torch can use them, else the CPU; cpu: on the CPU on purpose, even "
                             "on a machine with GPUs (default: %(default)s)")
    parser.add_argument("--staged", action="store_true",
                        help="load the text encoders, encode the prompt, free them, then load the transformer and VAE")
    parser.add_argument("--plan", action="store_true", help="load no weights: print where everything would go")
    parser.add_argument("--json", action="store_true", help="with --plan: print the plan as one JSON document")
    parser.add_argument("--num-devices", type=int, help="with --plan: plan for N devices (default: those present)")
    parser.add_argument("--device-memory", metavar="SIZE",
                        help="with --plan: memory of each planned device, e.g. 24GiB (default: that present)")
    args = parser.parse_args()
    for name in ("height", "width", "num_inference_steps", "max_sequence_length", "num_devices"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be a positive number, not {getattr(args, name)}")
    if args.max_sequence_length > 512:
        fail(f"--max-sequence-length {args.max_sequence_length}: FLUX.1's T5 takes at most 512 tokens")
    # Planning for hardware that is not here: --plan --num-devices 2 --device-memory 24GiB
    args.planned = args.num_devices is not None or args.device_memory is not None
    if not args.plan and (args.json or args.planned):
        fail("--json, --num-devices and --device-memory describe a plan: add --plan")
    if not args.plan:  # find out now, not after loading 32 GB and 50 steps, that the image cannot be saved
        if args.output.is_dir():
            fail(f"--output {args.output} is a folder: name the image file, e.g. {args.output / 'flux-dev.png'}")
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"--output {args.output}: cannot create its folder ({e.strerror})")
        if not os.access(args.output.parent, os.W_OK):
            fail(f"--output {args.output}: its folder is not writable")
    return args


def check_flux_model(args):
    """Fail early, before loading weights: the model can be found, is a FLUX.1 pipeline, and takes this size."""
    model = Path(args.model).expanduser()
    if model.exists() and not (model / "model_index.json").exists():
        fail(f"--model {args.model} is not a diffusers pipeline folder: it has no model_index.json")
    if not model.exists() and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", args.model):
        fail(f"--model {args.model}: no such folder, and not a Hub id (organisation/name)")
    diffusers.utils.logging.set_verbosity_error()  # a failed Hub look-up is said once, by us, not three times
    huggingface_hub.utils.logging.set_verbosity_error()
    with explained_load_errors(args.model), warnings.catch_warnings(action="ignore"):  # the configs: a few kB
        components = DiffusionPipeline.load_config(args.model)
        vae = AutoencoderKL.load_config(args.model, subfolder="vae")
    diffusers.utils.logging.set_verbosity_warning()  # from here on, the libraries' warnings show again
    huggingface_hub.utils.logging.set_verbosity_warning()
    accelerate.utils.modeling.logger.setLevel("ERROR")  # "device 1 is not available" while planning for it
    if components.get("_class_name") != "FluxPipeline":
        fail(f"--model {args.model} is a {components.get('_class_name')}: this script is for FLUX.1 pipelines")
    # The VAE shrinks images 8x (2 per block after the first), and Flux packs 2x2 latents: multiples of 16.
    multiple = 2 ** (len(vae["block_out_channels"]) - 1) * 2
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value % multiple:
            fail(f"{flag} {value} does not suit {args.model}: use a multiple of {multiple}, "
                 f"e.g. {max(multiple, value // multiple * multiple)}")
    return components


def device_memory(args):
    """The memory each device may use, in bytes: {0: ..., 1: ...}, plus "cpu" where the user adds it."""
    if args.planned:  # hardware the user does not have: --plan --num-devices 2 --device-memory 24GiB
        # The devices present are measured only to give the planned ones their size: --device-memory gives it.
        measure = args.device_memory is None and torch.accelerator.is_available()
        present = free_memory_of_each_device() if measure else {}
        if args.device_memory is None and not present:
            fail("--num-devices needs --device-memory SIZE here: this machine has no accelerator to measure")
        try:
            each = convert_file_size_to_int(args.device_memory) if args.device_memory else min(present.values())
        except ValueError:
            fail(f"--device-memory {args.device_memory}: write a size like 16GiB or 24GB")
        budgets = dict.fromkeys(range(args.num_devices or len(present) or 1), each)
    elif args.device != "cpu" and torch.accelerator.is_available():
        budgets = free_memory_of_each_device()
    else:  # no accelerator (or --device cpu): the CPU is the one device, with the RAM that is free
        budgets = {"cpu": psutil.virtual_memory().available}
    if args.max_memory:
        asked = parse_memory(args.max_memory, list(budgets))
        unknown = [d for d in asked if d not in budgets and d != "cpu"]
        if unknown:
            fail(f"--max-memory names device {unknown[0]}, but the devices are {', '.join(map(str, budgets))}")
        budgets |= asked  # cpu=SIZE adds the CPU to the devices, it does not replace them
    return budgets


def parse_memory(text, devices):
    """`16GiB` -> that much on each of `devices`; `0=10GiB,1=16GiB,cpu=32GiB` -> those devices only (bytes)."""
    try:
        if "=" not in text:
            return {d: convert_file_size_to_int(text.strip()) for d in devices}
        pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
        return {(int(d) if d.strip().isdigit() else d.strip()): convert_file_size_to_int(s.strip()) for d, s in pairs}
    except ValueError:
        fail(f"--max-memory {text}: write sizes like 16GiB or 24GB, for every device or as 0=10GiB,1=16GiB")


def free_memory_of_each_device():
    """Free memory of each accelerator, as Accelerate measures it. Accelerate leaves out, without a word, a device
    it cannot query: one that cannot be used (a GPU busy in exclusive-process mode) stays out, and the note says
    so; one that works but cannot tell its free memory (some Intel GPUs) counts with its total memory."""
    free = {d: m for d, m in get_max_memory().items() if isinstance(d, int)}
    kind, unread, unusable = torch.accelerator.current_accelerator().type, [], {}
    for i in range(torch.accelerator.device_count()):
        if i not in free:
            try:
                torch.zeros(1, device=torch.device(kind, i))  # usable at all? (as Accelerate tries it)
                unread.append(i)
            except RuntimeError as e:  # torch.AcceleratorError is one
                unusable[i] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    for i, why in unusable.items():
        print(f"note: {device_name(i)} cannot be used ({why}): leaving it out", file=sys.stderr)
    if unread:  # e.g. Intel GPUs whose torch.xpu.mem_get_info raises
        properties = torch.get_device_module(torch.accelerator.current_accelerator()).get_device_properties
        free |= {i: properties(i).total_memory for i in unread}
        print(f"note: the free memory of {', '.join(map(device_name, unread))} cannot be read: counting on "
              "the total memory instead; lower --max-memory if something else uses it", file=sys.stderr)
    return dict(sorted(free.items()))


def make_plan(args, components, budgets, dtype, staged=None):
    """The whole plan, for the run as asked (staged or not): each stage, bytes per device, and whether it fits."""
    staged = args.staged if staged is None else staged
    reserve = int(RESERVE_AT_1024 * args.height * args.width / 1024**2)
    # Each device keeps the activations' reserve; so does the CPU when it is the one device, not an overflow.
    usable = {d: max(0, m - reserve) if d != "cpu" or len(budgets) == 1 else m for d, m in budgets.items()}
    if not any(usable.values()):
        fail(f"no device has room for weights beyond the {size(reserve)} each keeps for activations at "
             f"{args.height}x{args.width}: give them more memory (--max-memory, --device-memory), make smaller "
             "images, or add cpu=SIZE to --max-memory (slow)")
    stages = []
    for names in ([TEXT_STAGE, IMAGE_STAGE] if staged else [TEXT_STAGE + IMAGE_STAGE]):
        modules = {name: empty_model(args.model, name, *components[name], dtype) for name in names}
        stages.append(plan_stage(modules, usable, dtype))
    # A staged run frees each stage before the next: a device's peak is its busiest stage.
    peak = {d: max(s["held"].get(d, 0) for s in stages) for s in stages for d in s["held"]}
    plan = {"fits": "disk" not in peak and all(b <= usable.get(d, 0) for d, b in peak.items()), "staged": staged,
            "devices": {str(d): b for d, b in sorted(peak.items(), key=lambda i: str(i[0])) if d != "disk" and b},
            "placement": {(f"{n}.{k}" if k else n): str(d) for s in stages for n, m in s["device_maps"].items()
                          for k, d in m.items()},
            "components": {n: int(b) for s in stages for n, b in s["components"].items()},
            "bytes": {k: int(b) for s in stages for k, b in s["bytes"].items()}, "unplaced": int(peak.get("disk", 0)),
            "budgets": {str(d): int(b) for d, b in budgets.items()}, "reserved_per_device": reserve,
            "dtype": str(dtype).removeprefix("torch."), "stages": stages, "usable": usable,
            "needed": max(sum(s["held"].values()) for s in stages), "hint": ""}
    if not plan["fits"] and not staged and make_plan(args, components, budgets, dtype, staged=True)["fits"]:
        plan["hint"] = "; it fits with --staged (text encoders first, freed, then the transformer and VAE)"
    return plan


def plan_stage(modules, usable, dtype):
    """Where each component of one stage goes, as the load will put it: {name: device map}, and bytes per device."""
    gpus = {d: m for d, m in usable.items() if d != "cpu" and m > 0} or {"cpu": usable["cpu"]}  # no GPU: the CPU
    # 1. Whole components where "balanced" puts them, sized as diffusers sizes them, every weight at `dtype`: one it
    #    loads itself from its empty model (which leaves T5's `shared` and `encoder.embed_tokens` untied: its
    #    embedding counted twice), one handed to it by its real size (a loaded T5 is tied: its embedding once).
    #    A component "balanced" leaves to the CPU is split, loaded and handed over, so "balanced" then sees it
    #    smaller and may place the others differently: decide again with it handed over, until nothing more is split.
    empty = {name: compute_module_sizes(module, dtype=dtype)[""] for name, module in modules.items()}
    for module in modules.values():  # as loaded, one tensor: tied, accelerate keeps the two on one device
        if isinstance(module, transformers.PreTrainedModel):
            module.tie_weights()
    handed = {name: compute_module_sizes(module, dtype=dtype)[""] for name, module in modules.items()}
    split = set()
    while True:
        whole = balanced({n: handed[n] if n in split else empty[n] for n in modules}, gpus)
        if {n for n, d in whole.items() if d not in gpus} <= split:
            break
        split |= {n for n, d in whole.items() if d not in gpus}
    sizes = {name: compute_module_sizes(module) for name, module in modules.items()}  # bytes, as loaded
    device_maps = {name: {"": d} for name, d in whole.items() if name not in split}
    held = Counter({d: 0 for d in gpus})
    for name, device_map in device_maps.items():
        held[device_map[""]] += sizes[name][""]
    # 2. A component "balanced" would leave to the CPU is split between its blocks instead (`_no_split_modules`
    #    stay whole). Each device may take up to an equal share of the stage, plus one block, less what it already
    #    holds: the device with T5 takes fewer transformer blocks. Accelerate fills the devices in their order, the
    #    last one taking what is left, then the CPU where the user added it, then "disk": no room anywhere.
    share, order, rooms = sum(s[""] for s in sizes.values()) / len(gpus), sorted(gpus, key=str), {}
    for name in sorted(set(modules) - set(device_maps), key=lambda n: sizes[n][""], reverse=True):
        module = modules[name]
        block = max((sizes[name][k] for k, m in module.named_modules() if type(m).__name__ in module._no_split_modules),
                    default=0)
        room = {d: max(0, min(gpus[d], share + block) - held[d]) for d in order[:-1]}
        room[order[-1]] = max(0, gpus[order[-1]] - held[order[-1]])
        if "cpu" in usable and "cpu" not in gpus:
            room["cpu"] = usable["cpu"] - held["cpu"]
        rooms[name] = room
        with warnings.catch_warnings(action="ignore"):
            device_maps[name] = infer_auto_device_map(module, max_memory=room,
                                                      no_split_module_classes=module._no_split_modules)
        for key, d in device_maps[name].items():
            held[d] += sizes[name][key]
    return {"names": tuple(modules), "split": [n for n in modules if n in split], "max_memory": gpus,
            "device_maps": device_maps, "room": rooms, "held": held, "components": {n: s[""] for n, s in sizes.items()},
            "bytes": {f"{n}.{k}" if k else n: sizes[n][k] for n, m in device_maps.items() for k in m}}


def balanced(sizes, max_memory):
    """Where `DiffusionPipeline.from_pretrained(device_map="balanced", max_memory=...)` puts each whole component:
    largest first, each on the next device of d0, d1, ..., d1, d0 (most memory first); one that does not fit on its
    turn's device goes to the CPU. (tests/test_model_parallelism.py checks this against diffusers' own code.)"""
    devices = sorted(sorted(d for d in max_memory if d != "cpu"), key=max_memory.get, reverse=True)
    room, turn, where = dict(max_memory), 0, {}
    for name in sorted(sizes, key=sizes.get, reverse=True):
        device = (devices + devices[::-1])[turn % (2 * len(devices))] if devices else "cpu"
        if device == "cpu" or sizes[name] > room[device]:
            where[name] = "cpu"
            continue
        where[name], room[device], turn = device, room[device] - sizes[name], turn + 1
    return where


def empty_model(model, name, library, class_name, dtype):
    """A component built on the meta device from its config.json alone, as diffusers builds it to place it, with
    the weights transformers or diffusers keep in float32 at this dtype (T5's `wo` in float16): no weights."""
    cls = getattr(importlib.import_module(library), class_name)
    with explained_load_errors(model), warnings.catch_warnings(action="ignore"), init_empty_weights():
        if issubclass(cls, transformers.PreTrainedModel):
            module = cls(transformers.AutoConfig.from_pretrained(model, subfolder=name)).to(dtype)
            keep = set(module._keep_in_fp32_modules or []) if dtype == torch.float16 else set()
            if dtype in (torch.float16, torch.bfloat16):
                keep |= set(module._keep_in_fp32_modules_strict or [])
        else:
            module = cls.from_config(cls.load_config(model, subfolder=name)).to(dtype)
            keep = set(module._keep_in_fp32_modules or [])
    for path, submodule in module.named_modules():
        if keep & set(path.split(".")):
            submodule.to(torch.float32)
    return module


def print_plan(args, plan):
    """Where everything goes and whether it fits; with --json, the plan as one JSON document."""
    if args.json:
        print(json.dumps({k: plan[k] for k in ("fits", "devices", "placement", "components", "bytes", "unplaced",
                                               "budgets", "reserved_per_device", "dtype", "staged")}, indent=2))
        return
    where = "planned" if args.planned else "on this machine"
    print(f"plan for {args.model} in {plan['dtype']}, {args.height}x{args.width}, "
          f"{'staged' if plan['staged'] else 'all components resident at once'}, devices {where}:")
    for number, stage in enumerate(plan["stages"], 1):
        if plan["staged"]:
            print(f"  stage {number}: {', '.join(stage['names'])}")
        for name, device_map in stage["device_maps"].items():
            if name in stage["split"]:
                print(f"  {name} ({size(plan['components'][name])}) fits on no single device whole: split between "
                      "its blocks")
            for key, d in block_ranges(device_map):
                print(f"    {name + ('.' + key if key else ''):<52} -> {'nowhere: no room' if d == 'disk' else d}")
    for d, b in plan["devices"].items():
        print(f"  device {d}: {size(b)} of weights, of {size(plan['budgets'][d])}"
              + (f" ({size(plan['reserved_per_device'])} of it kept for activations)" if d != "cpu" or
                 len(plan["budgets"]) == 1 else ""))
    if plan["unplaced"]:
        print(f"  {size(plan['unplaced'])} of weights find no room on any device")
    on_cpu = cpu_only(plan["placement"])
    streamed = sum(b for key, b in plan["bytes"].items() if plan["placement"][key] == "cpu" and
                   key.split(".")[0] not in on_cpu)
    if streamed and len(plan["budgets"]) > 1:
        print(f"  NOTE: {size(streamed)} of weights on the CPU, streamed to the devices at every step: slow")
    if on_cpu and len(plan["budgets"]) > 1:
        print(f"  NOTE: {', '.join(on_cpu)} wholly on the CPU: Accelerate runs it there, on the CPU's cores, which "
              "is many times slower than a GPU; only its inputs and outputs move to and from the devices")
    print(f"  fits: {'yes' if plan['fits'] else 'NO'}" + plan["hint"])


def cpu_only(placement):
    """The components every part of which is on the CPU ({"text_encoder_2.encoder.block.0": "cpu", ...}): Accelerate
    runs such a component on the CPU itself, where a component with some blocks on a GPU has the others streamed."""
    devices = {}
    for key, d in placement.items():
        devices.setdefault(key.split(".")[0], set()).add(str(d))
    return [name for name, on in devices.items() if on == {"cpu"}]


def block_ranges(device_map):
    """{"blocks.0": 0, "blocks.1": 0, "blocks.2": 1} -> [("blocks.0-1", 0), ("blocks.2", 1)]: one line a range."""
    rows = []  # [prefix, first index, last index, device]
    for key, device in device_map.items():
        prefix, _, index = key.rpartition(".")
        if index.isdigit() and rows and rows[-1][0] == prefix and rows[-1][3] == device:
            rows[-1][2] = index
        else:
            rows.append([prefix, index, index, device] if index.isdigit() else [key, None, None, device])
    return [(f"{p}.{a}" + (f"-{b}" if b != a else "") if a else p, d) for p, a, b, d in rows]


def check_fits(args, plan):
    """A real run whose plan does not fit stops before loading anything, with what would make it fit."""
    if not plan["fits"]:
        fail(f"{args.model} does not fit: it needs {size(plan['needed'])} of weights at once, the devices have "
             f"{size(sum(plan['usable'].values()))} for them after keeping {size(plan['reserved_per_device'])} each "
             f"for activations{plan['hint']}, or add cpu=SIZE to --max-memory to let the CPU hold the rest (slow)",
             code=1)


def hook_the_unsplit(split, stage):
    """A component the plan split that lands on one device after all still needs the hook that brings its inputs
    there, as "balanced" gives the whole ones."""
    for name in split:
        if len(set(stage["device_maps"][name].values())) == 1:
            dispatch_model(split[name], device_map=stage["device_maps"][name], force_hooks=True)


def left_out(names):
    """The pipeline's components that are not in this stage, and not loaded (tokenizers go with the text encoders)."""
    out = {n: None for n in TEXT_STAGE + IMAGE_STAGE if n not in names}
    return out | ({"tokenizer": None, "tokenizer_2": None} if "text_encoder" not in names else {})


def show_the_stage(pipeline, split, stage, started):
    """Where the stage's components went, and the memory in use; the FP64 fix where a device lacks it. Returns
    the devices in use."""
    print(f"{'text encoders' if stage['names'] == TEXT_STAGE else 'pipeline'} loaded "
          f"({time.perf_counter() - started:.1f} s from the start):")
    devices = print_placement(pipeline, split)
    no_fp64_remedy(pipeline, [device_name(d) for d in devices])  # FLUX on Intel Arc A-series GPUs
    return devices


def print_placement(pipeline, split):
    """Print where everything is and the memory in use on each device; return the devices."""
    rows = placement(pipeline, split)
    offload = any(d != "cpu" for _, d in rows)  # a CPU beside accelerators only holds what they could not
    on_cpu = cpu_only({name: d for name, d in rows})
    for name, d in rows:
        print(f"  {name:<52} -> {device_name(d)}" + ("" if d != "cpu" or not offload else " (runs on the CPU: slow)"
                                                     if name.split(".")[0] in on_cpu else
                                                     " (streamed to the device at every step: slow)"))
    devices = sorted({d for _, d in rows}, key=str)
    used = memory_in_use(devices)
    print("  memory in use: " + "; ".join(memory_text(d, used[d]) for d in devices))
    return devices


def placement(pipeline, split):
    """Where the libraries put each component, and each range of a split one's blocks, from their own record
    (`hf_device_map`): [(name, device)]. With no accelerator there is no record: the component's own device."""
    record = pipeline.hf_device_map or {}
    rows = []
    for name, module in pipeline.components.items():
        if isinstance(module, torch.nn.Module):
            device_map = split[name].hf_device_map if name in split else {"": record.get(name, module.device.type)}
            rows += [(name + ("." + key if key else ""), d) for key, d in block_ranges(device_map)]
    return rows


def memory_in_use(devices, peak=False):
    """Memory in use (or its peak) on each device, in bytes: (allocated, reserved) on a GPU (gpu_memory); for the
    CPU, this process's resident memory."""
    used = {}
    for d in devices:
        if d != "cpu":
            used[d] = gpu_memory(d, peak)
        elif peak and sys.platform != "win32":
            import resource  # ru_maxrss is in KiB on Linux, in bytes on macOS
            used[d] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        else:
            used[d] = psutil.Process().memory_info().rss
    return used


def memory_text(d, used):
    """`xpu:0 10.21 GiB allocated, 11.02 GiB reserved`, `cpu 0.79 GiB`: each figure named."""
    if isinstance(used, tuple):
        return f"{device_name(d)} {used[0] / GiB:.2f} GiB allocated, {used[1] / GiB:.2f} GiB reserved"
    return f"{device_name(d)} {used / GiB:.2f} GiB"


def device_name(d):
    return f"{torch.accelerator.current_accelerator().type}:{d}" if isinstance(d, int) else str(d)


def encode_prompt(args, pipeline):
    """--staged: the text encoders' prompt embeddings, which the image stage takes in place of the prompt."""
    with torch.no_grad():
        prompt_embeds, pooled_prompt_embeds, _ = pipeline.encode_prompt(
            prompt=args.prompt, prompt_2=None, max_sequence_length=args.max_sequence_length)
    return dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)


def reset_peak_memory(devices):
    for d in devices:
        if d != "cpu":
            torch.accelerator.reset_peak_memory_stats(d)


def report(args, image, seconds, step_times, t0, devices):
    per_step = (step_times[-1] - t0) / len(step_times) if step_times else seconds
    peak = memory_in_use(devices, peak=True)
    print(f"made {args.output} ({image.width}x{image.height}) in {seconds:.1f} s, {per_step:.2f} s per step; "
          "peak memory: " + "; ".join(memory_text(d, peak[d]) for d in devices))


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


# Copied from data-parallelism-accelerate.py::no_fp64_remedy
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


# Copied from data-parallelism-accelerate.py::asks_for_float64
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


# Copied from data-parallelism-accelerate.py::OnTheCPU
class OnTheCPU(torch.nn.Module):
    """Runs a module that holds no weights on the CPU, and hands its outputs to the device its input came from."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, ids):
        return tuple(output.to(ids.device) for output in self.module(ids.cpu()))


# Copied from data-parallelism-accelerate.py::gpu_memory
def gpu_memory(device, peak=False):
    """The memory of one GPU that this process holds (or its peak), in bytes: (allocated, reserved). Allocated is
    what torch's tensors hold; reserved is what torch's caching allocator holds from the GPU, allocated or not:
    what nvidia-smi and xpu-smi show for the process, less its context (a few hundred MB)."""
    if peak:
        return torch.accelerator.max_memory_allocated(device), torch.accelerator.max_memory_reserved(device)
    return torch.accelerator.memory_allocated(device), torch.accelerator.memory_reserved(device)


# Copied from data-parallelism-accelerate.py::size
def size(b):
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:.1f} MiB"


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


if __name__ == "__main__":
    try:
        main()
    except torch.OutOfMemoryError:
        fail("a device ran out of memory: try --staged, a smaller --height/--width, or a lower --max-memory to "
             "leave more room for activations", code=1)
    except KeyboardInterrupt:
        fail("interrupted", code=130)
