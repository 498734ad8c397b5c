"""Model parallelism (sharding): one FLUX.1 pipeline spread over several devices, for a model that fits on none.

FLUX.1-dev in bfloat16 is about 31.7 GiB: transformer 22.2 GiB, T5-XXL text encoder 9.1 GiB, CLIP-L 0.23 GiB,
VAE 0.16 GiB. The script places it in two steps, and prints what it did:

1. Pipeline level: `from_pretrained(..., device_map="balanced")` puts *whole components* on devices, largest
   first. A component that fits on no single device would land on the CPU (and be slow), so instead:
2. Layer level: that component (the transformer, or T5 on small cards) is split between its blocks over all the
   devices with Accelerate's `infer_auto_device_map`, each device taking an equal share of the pipeline.

With --staged the pipeline is not held all at once: the text encoders make the prompt embeddings and are freed,
then the transformer and the VAE make the image. This is what fits FLUX.1-dev on two 16 GB cards.

    uv run model-parallelism-flux.py                                      # every GPU (Intel or NVIDIA) present
    uv run model-parallelism-flux.py --staged                             # text encoders first, then the rest
    uv run model-parallelism-flux.py --plan --num-devices 2 --device-memory 16GiB   # will it fit? no download
    uv run model-parallelism-flux.py --model tiny/flux --height 64 --width 64 --num-inference-steps 2  # CPU

--plan reads only the configs (a few kilobytes) and builds the model on the meta device: no weights are loaded.
On each device it keeps 3 GiB free for activations at 1024x1024 (scaled with the pixel count): the VAE decoding
the full-size image and one transformer block working on 4096 image + 512 text tokens each need 1-3 GiB.
"""

import argparse
import gc
import importlib
import itertools
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import accelerate
import diffusers
import huggingface_hub
import psutil
import torch
import transformers
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
from accelerate.utils import compute_module_sizes, convert_file_size_to_int, get_max_memory
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.pipelines.pipeline_loading_utils import _assign_components_to_devices  # what "balanced" calls
from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"
DEFAULT_PROMPT = "A cat holding a sign that says hello world"
GiB = 2**30
RESERVE_AT_1024 = 3 * GiB  # activations kept free on each device at 1024x1024, scaled with the pixel count
TEXT_STAGE, IMAGE_STAGE = ("text_encoder", "text_encoder_2"), ("transformer", "vae")


def main():
    args = parse_args()
    components = check_model(args)
    on_gpu = args.planned or torch.accelerator.is_available()
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.bfloat16 if on_gpu else torch.float32
    accelerate.utils.modeling.logger.setLevel("ERROR")  # "device 0 is not available" while planning for it

    # 1. Plan, from the configs alone (the model on the meta device, no weights): whole components where
    #    device_map="balanced" puts them, and a component that fits on no single device split between its
    #    blocks over all of them. --plan stops here.
    plan = make_plan(args, components, dtype)
    if args.plan:
        if args.json:
            keys = ("fits", "devices", "placement", "staged", "unplaced", "reserved_per_device", "budgets", "dtype",
                    "components", "bytes")
            print(json.dumps({k: plan[k] for k in keys}, indent=2))
        else:
            print_plan(args, plan)
            suggest_staged(args, components, dtype, plan)
        return
    print_plan(args, plan)
    if not plan["fits"]:
        staged = "" if args.staged else suggest_staged(args, components, dtype, plan, quiet=True)
        fail(f"{args.model} does not fit: {'its largest stage' if args.staged else 'it'} needs {size(plan['needed'])} "
             f"of weights, the devices have {size(sum(plan['usable'].values()))} for them after keeping "
             f"{size(plan['reserved_per_device'])} each for activations{staged}, or name cpu=SIZE in "
             "--max-memory to let the CPU hold the rest (slow)", code=1)
    devices = [d if d == "cpu" else int(d) for d in plan["devices"]]

    # 2. Load the weights where the plan puts them: `from_pretrained(..., device_map="balanced")` when every
    #    component fits whole on a device, else each component with its own device map (see load()).
    #    Accelerate's hooks then move the activations from device to device as the pipeline runs: the devices
    #    take turns on one image, they do not work at the same time.
    # The starting noise comes from a CPU generator: the same seed gives the same image on any device.
    options = dict(height=args.height, width=args.width, num_inference_steps=args.num_inference_steps,
                   guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length,
                   generator=torch.Generator("cpu").manual_seed(args.seed))
    started = time.perf_counter()
    if args.staged:  # 1. the text encoders alone make the prompt embeddings, and are freed
        pipeline = load(args, components, plan, TEXT_STAGE, dtype)
        print("text encoders loaded:")
        print_placement(pipeline, plan, devices)
        with torch.no_grad():
            prompt_embeds, pooled_prompt_embeds, _ = pipeline.encode_prompt(
                prompt=args.prompt, prompt_2=None, max_sequence_length=args.max_sequence_length)
        # Free the text encoders before the transformer loads: drop every reference, then the memory.
        pipeline.remove_all_hooks()
        del pipeline
        release_memory()
        stage = IMAGE_STAGE
        inputs = dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)
    else:
        stage, inputs = TEXT_STAGE + IMAGE_STAGE, dict(prompt=args.prompt)
    pipeline = load(args, components, plan, stage, dtype)  # 2. the transformer and the VAE make the image
    print(f"loaded in {time.perf_counter() - started:.1f} s:")
    print_placement(pipeline, plan, devices)

    # 3. Generate one image, timing each step, then save it and report the peak memory of every device.
    for d in devices:
        if d != "cpu":
            torch.accelerator.reset_peak_memory_stats(d)
    step_times = []
    t0 = time.perf_counter()
    image = pipeline(**inputs, **options, callback_on_step_end=lambda *a: step_times.append(time.perf_counter()) or {}
                     ).images[0]
    seconds = time.perf_counter() - t0
    tmp = args.output.with_name(f".{args.output.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, args.output)  # written whole, then renamed: never half an image on disk
    finally:
        tmp.unlink(missing_ok=True)
    per_step = (step_times[-1] - t0) / len(step_times) if step_times else seconds
    peak = memory(devices, peak=True)
    print(f"made {args.output} ({image.width}x{image.height}) in {seconds:.1f} s, {per_step:.2f} s per step; "
          "peak memory: " + ", ".join(f"{device_name(d)} {peak[d] / GiB:.2f} GiB" for d in devices))


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
                        help="weights' dtype; auto is bfloat16 on GPUs and float32 on the CPU (default: %(default)s)")
    parser.add_argument("--max-memory", metavar="SIZE|DEV=SIZE,...",
                        help="memory to use: one size for every device (16GiB), or per device (0=10GiB,1=16GiB); "
                             "naming cpu=SIZE lets the CPU hold what the devices cannot (slow) "
                             "(default: the free memory of every device)")
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
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"--output {args.output}: cannot create its folder ({e.strerror})")
        if not os.access(args.output.parent, os.W_OK):
            fail(f"--output {args.output}: its folder is not writable")
    return args


def fail(message, code=2):
    """One line on stderr and a non-zero exit, no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_model(args):
    """Fail early, before loading weights: the model can be found, is a FLUX.1 pipeline, and takes this size."""
    model = Path(args.model).expanduser()
    if model.exists() and not (model / "model_index.json").exists():
        fail(f"--model {args.model} is not a diffusers pipeline folder: it has no model_index.json")
    if not model.exists() and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", args.model):
        fail(f"--model {args.model}: no such folder, and not a Hub id (organisation/name)")
    diffusers.utils.logging.set_verbosity_error()  # a failed Hub look-up is said once, by us, not three times
    huggingface_hub.utils.logging.set_verbosity_error()
    try:  # the configs only: a few kilobytes
        with warnings.catch_warnings(action="ignore"):
            components = DiffusionPipeline.load_config(args.model)
            vae = AutoencoderKL.load_config(args.model, subfolder="vae")
    except (OSError, ValueError) as e:
        fail(cannot_load(args.model, e))
    diffusers.utils.logging.set_verbosity_warning()
    if components.get("_class_name") != "FluxPipeline":
        fail(f"--model {args.model} is a {components.get('_class_name')}: this script is for FLUX.1 pipelines")
    # The VAE shrinks images 8x (2 per block after the first), and Flux packs 2x2 latents: multiples of 16.
    multiple = 2 ** (len(vae["block_out_channels"]) - 1) * 2
    for flag, size in (("--height", args.height), ("--width", args.width)):
        if size % multiple:
            fail(f"{flag} {size} does not suit {args.model}: use a multiple of {multiple}, "
                 f"e.g. {max(multiple, size // multiple * multiple)}")
    return components


def cannot_load(model, error):
    """One line for a model that cannot be loaded, with what went wrong and what to do."""
    reason = None
    while reason is None and error is not None:  # diffusers wraps the Hub's error: look down the chain
        if isinstance(error, GatedRepoError):
            reason = "it is gated, and this account has not been granted access"
        elif isinstance(error, RepositoryNotFoundError):
            reason = "no such model on the Hub, or it is private"
        elif isinstance(error, (OfflineModeIsEnabled, ConnectionError)) or "Name or service not known" in str(error):
            reason = "it is not in the local cache, and the Hub cannot be reached"
        elif error.__cause__ is None and error.__context__ is None:
            reason = str(error).splitlines()[0]
        error = error.__cause__ or error.__context__
    return (f"cannot load --model {model} ({reason}). If it is gated, accept its licence on "
            f"https://huggingface.co/{model} and run `hf auth login` (black-forest-labs/FLUX.1-schnell is not "
            f"gated); or pass --model PATH to a local copy")


def parse_memory(text, devices):
    """`16GiB` -> that much on each of `devices`; `0=10GiB,1=16GiB,cpu=32GiB` -> those devices only (bytes)."""
    try:
        if "=" not in text:
            return {d: convert_file_size_to_int(text.strip()) for d in devices}
        pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
        return {(int(d) if d.strip().isdigit() else d.strip()): convert_file_size_to_int(s.strip()) for d, s in pairs}
    except ValueError:
        fail(f"--max-memory {text}: write sizes like 16GiB or 24GB, for every device or as 0=10GiB,1=16GiB")


def device_budgets(args):
    """The memory each device may use, in bytes: {0: ..., 1: ...}, plus "cpu" only where the user allows it."""
    if args.planned:  # hardware the user does not have: --plan --num-devices 2 --device-memory 24GiB
        present = get_max_memory() if torch.accelerator.is_available() else {}
        count = args.num_devices or max(1, len([d for d in present if d != "cpu"]))
        if args.device_memory is None and 0 not in present:
            fail("--num-devices needs --device-memory SIZE here: this machine has no accelerator to measure")
        try:
            size = convert_file_size_to_int(args.device_memory) if args.device_memory else present[0]
        except ValueError:
            fail(f"--device-memory {args.device_memory}: write a size like 16GiB or 24GB")
        budgets = dict.fromkeys(range(count), size)
    elif torch.accelerator.is_available():
        budgets = {d: m for d, m in get_max_memory().items() if d != "cpu"}  # the free memory of each device
    else:  # no accelerator: the CPU is the one device, with the RAM that is free
        budgets = {"cpu": psutil.virtual_memory().available}
    if args.max_memory:
        asked = parse_memory(args.max_memory, list(budgets))
        unknown = [d for d in asked if d not in budgets and d != "cpu"]
        if unknown:
            fail(f"--max-memory names device {unknown[0]}, but the devices are {', '.join(map(str, budgets))}")
        budgets = asked
    return budgets


def empty_components(model, components, names, dtype):
    """Each component built on the meta device from its config.json alone: its real shapes, no weights."""
    modules = {}
    with warnings.catch_warnings(action="ignore"), init_empty_weights():
        for name in names:
            library, class_name = components[name]
            cls = getattr(importlib.import_module(library), class_name)
            if library == "diffusers":
                modules[name] = cls.from_config(cls.load_config(model, subfolder=name))
            else:
                modules[name] = cls._from_config(transformers.AutoConfig.from_pretrained(model, subfolder=name))
    return modules


def plan_stage(modules, budgets, dtype):
    """Where each component, or each block of a component too big for one device, goes: {name: device_map}."""
    sizes = {name: compute_module_sizes(m, dtype=dtype)[""] for name, m in modules.items()}
    sizes = dict(sorted(sizes.items(), key=lambda item: item[1], reverse=True))
    devices = {d: m for d, m in sorted(budgets.items(), key=lambda item: item[1], reverse=True) if d != "cpu"}
    devices = devices or dict(budgets)  # no accelerator: the CPU is the device
    # 1. Pipeline level: exactly what device_map="balanced" does. Largest component first, to the devices in the
    #    order 0, 1, ..., 1, 0; a component that does not fit on its turn's device goes to the CPU.
    whole = _assign_components_to_devices(sizes, devices)
    placement = {name: {"": d} for d, names in whole.items() if d != "cpu" or "cpu" in devices for name in names}
    if len(placement) == len(sizes):
        return placement, sizes, True  # True: device_map="balanced" itself places this stage as planned
    # 2. Layer level: split what "balanced" left over between its blocks (`_no_split_modules`, which must stay
    #    whole), so that each device holds an equal share of the pipeline: the whole components it already has,
    #    plus up to one block more. The last device takes what remains. "cpu" only if the user named it.
    used = {d: sum(sizes[n] for n, m in placement.items() if m[""] == d) for d in budgets}
    share = sum(sizes.values()) / len(devices)
    for name in (n for n in sizes if n not in placement):
        module, block_classes = modules[name], modules[name]._no_split_modules
        block = max((compute_module_sizes(m, dtype=dtype)[""] for m in module.modules()
                     if type(m).__name__ in block_classes), default=0)
        last = list(devices)[-1]
        room = {d: max(0, min(budgets[d] - used[d], share + block - used[d])) for d in devices if d != last}
        room |= {last: budgets[last] - used[last]} | ({"cpu": budgets["cpu"] - used["cpu"]} if "cpu" in budgets else {})
        with warnings.catch_warnings(action="ignore"):
            placement[name] = infer_auto_device_map(module, max_memory=room, no_split_module_classes=block_classes,
                                                    dtype=dtype)
        for key, d in placement[name].items():
            used[d] = used.get(d, 0) + compute_module_sizes(module.get_submodule(key) if key else module, dtype=dtype)[""]
    return placement, sizes, False


def make_plan(args, components, dtype):
    """The whole plan: placement, bytes per device, and whether it fits, for the run as asked (staged or not)."""
    budgets = device_budgets(args)
    reserve = int(RESERVE_AT_1024 * args.height * args.width / 1024**2)
    usable = {d: max(0, m - reserve) if d != "cpu" or len(budgets) == 1 else m for d, m in budgets.items()}
    stages = [TEXT_STAGE, IMAGE_STAGE] if args.staged else [TEXT_STAGE + IMAGE_STAGE]
    modules = empty_components(args.model, components, [n for s in stages for n in s], dtype)
    placement, sizes, peak, needed, module_bytes, balanced = {}, {}, {}, 0, {}, True
    for stage in stages:  # a staged run frees each stage before the next: a device's peak is its busiest stage
        stage_placement, stage_sizes, stage_balanced = plan_stage({n: modules[n] for n in stage}, usable, dtype)
        balanced &= stage_balanced
        placement |= stage_placement  # "disk": accelerate's word for "no room on any device" 
        sizes |= stage_sizes
        held = {}
        for name, device_map in stage_placement.items():
            for key, d in device_map.items():
                module = modules[name].get_submodule(key) if key else modules[name]
                bytes_ = module_bytes[f"{name}.{key}" if key else name] = compute_module_sizes(module, dtype=dtype)[""]
                held[d] = held.get(d, 0) + bytes_
        peak = {d: max(peak.get(d, 0), held.get(d, 0)) for d in held.keys() | peak.keys()}
        needed = max(needed, sum(held.values()))
    allowed = set(budgets)  # "cpu" is a place for weights only when it is the device or the user named it
    fits = all(d in allowed for m in placement.values() for d in m.values()) and all(
        peak[d] <= usable[d] for d in peak)
    return {"fits": fits, "staged": args.staged, "dtype": str(dtype).removeprefix("torch."),
            "devices": {str(d): int(b) for d, b in sorted(peak.items(), key=lambda item: str(item[0])) if d != "disk"},
            "unplaced": int(peak.get("disk", 0)), "needed": int(needed),
            "budgets": {str(d): int(b) for d, b in budgets.items()}, "reserved_per_device": reserve,
            "components": {n: int(s) for n, s in sizes.items()},
            "placement": {(f"{n}.{k}" if k else n): str(d) for n, m in placement.items() for k, d in m.items()},
            "bytes": module_bytes,
            "device_maps": placement, "usable": usable, "balanced": balanced}


def size(b):
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:.1f} MiB"


def print_plan(args, plan):
    where = "planned" if args.planned else "on this machine"
    print(f"plan for {args.model} in {plan['dtype']}, {args.height}x{args.width}, "
          f"{'staged' if plan['staged'] else 'all components resident at once'}, devices {where}:")
    for name, device_map in plan["device_maps"].items():
        if list(device_map) != [""]:
            print(f"  {name} ({size(plan['components'][name])}) fits on no single device, where device_map="
                  f"\"balanced\" would put it on the CPU: split layer by layer instead")
        for key, device in block_ranges(device_map):
            print(f"    {name + ('.' + key if key else ''):<52} -> {'nowhere: no room' if device == 'disk' else device}")
    for d, b in plan["devices"].items():
        print(f"  device {d}: {size(b)} of weights, of {size(plan['budgets'][d])} "
              f"({size(plan['reserved_per_device'])} of it kept for activations)")
    if plan["unplaced"]:
        print(f"  {size(plan['unplaced'])} of weights find no room on any device")
    if plan["devices"].get("cpu") and len(plan["devices"]) > 1:
        print(f"  NOTE: {size(plan['devices']['cpu'])} of weights on the CPU: streamed to device 0 at every step, "
              "which is slow")
    print(f"  fits: {'yes' if plan['fits'] else 'NO'}")


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


def load(args, components, plan, names, dtype):
    """Load the components `names` where the plan puts them; the pipeline's other components are left out."""
    device_maps = {name: plan["device_maps"][name] for name in names}
    left_out = {n: None for n in TEXT_STAGE + IMAGE_STAGE if n not in names}
    if "text_encoder" not in names:
        left_out |= {"tokenizer": None, "tokenizer_2": None}
    try:
        if plan["balanced"]:
            # Every component fits whole on the device balanced gives it: diffusers' own placement, as planned.
            return DiffusionPipeline.from_pretrained(args.model, device_map="balanced", max_memory=plan["usable"],
                                                     dtype=dtype, **left_out)
        # A component split layer by layer: load each component with its own device map, then hand them all to
        # the pipeline. (Handing one to a device_map="balanced" pipeline mixes up devices: diffusers #9450.)
        loaded = {}
        for name, device_map in device_maps.items():
            library, class_name = components[name]
            cls = getattr(importlib.import_module(library), class_name)
            loaded[name] = cls.from_pretrained(args.model, subfolder=name, device_map=device_map, dtype=dtype)
            if not hasattr(loaded[name], "_hf_hook"):
                # A component on one device gets a hook too, that moves its inputs to it, as "balanced" does.
                dispatch_model(loaded[name], device_map=device_map, force_hooks=True)
        return DiffusionPipeline.from_pretrained(args.model, dtype=dtype, **loaded, **left_out)
    except (OSError, ValueError) as e:  # e.g. the configs came from the cache but the weights cannot be fetched
        fail(cannot_load(args.model, e))


def release_memory():
    """Give the memory of weights nothing refers to any more back to the devices."""
    gc.collect()
    if torch.accelerator.is_available():
        torch.accelerator.empty_cache()


def memory(devices, peak=False):
    """Memory in use (or its peak) on each device, in bytes; for the CPU, this process's resident memory."""
    used = {}
    for d in devices:
        if d != "cpu":
            used[d] = torch.accelerator.max_memory_allocated(d) if peak else torch.accelerator.memory_allocated(d)
        elif peak and sys.platform != "win32":
            import resource  # ru_maxrss is in KiB on Linux, in bytes on macOS
            used[d] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        else:
            used[d] = psutil.Process().memory_info().rss
    return used


def print_placement(pipeline, plan, devices):
    """Where each component, and each range of the transformer's blocks, really is, read from its weights."""
    for name, module in pipeline.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for key, _ in block_ranges(plan["device_maps"][name]):
            part = module.get_submodule(key.split("-")[0]) if key else module
            tensor = next(itertools.chain(part.parameters(), part.buffers()), None)
            if tensor is None:  # a part with no weights at all (e.g. the rotary position embedding)
                continue
            device = tensor.device
            # Weights Accelerate keeps on the CPU and streams in at every step show as "meta" on the module.
            print(f"  {name + ('.' + key if key else ''):<52} -> "
                  f"{'cpu (streamed to the device at every step: slow)' if device.type == 'meta' else device}")
    used = memory(devices)
    print("  memory in use: " + ", ".join(f"{device_name(d)} {used[d] / GiB:.2f} GiB" for d in devices))


def device_name(d):
    return "cpu" if d == "cpu" else f"{torch.accelerator.current_accelerator().type}:{d}"


def suggest_staged(args, components, dtype, plan, quiet=False):
    """If the pipeline does not fit at once but fits in stages, say so (or return the hint, for an error)."""
    if plan["fits"] or args.staged:
        return ""
    if not make_plan(argparse.Namespace(**{**vars(args), "staged": True}), components, dtype)["fits"]:
        return ""
    hint = "; it fits with --staged (text encoders first, freed, then the transformer and VAE)"
    if not quiet:
        print("  " + hint[2:])
    return hint


if __name__ == "__main__":
    try:
        main()
    except torch.OutOfMemoryError:
        fail("a device ran out of memory: try --staged, a smaller --height/--width, or a lower --max-memory to "
             "leave more room for activations", code=1)
    except KeyboardInterrupt:
        fail("interrupted", code=130)
