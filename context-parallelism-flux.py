# SPDX-License-Identifier: MIT
# Follows diffusers' distributed inference guide (context parallelism):
#   https://huggingface.co/docs/diffusers/training/distributed_inference
"""Context parallelism: one FLUX.1 image made by several GPUs at once, each GPU working on a share of its tokens.

Every GPU holds the whole pipeline, as in data parallelism, but all of them make the SAME image together: the
transformer's sequence (the image's 4096 tokens at 1024x1024 and the prompt's 512) is split N ways, each GPU runs
every block on its 1/N of the tokens, and in each attention the GPUs swap pieces with all-to-alls (Ulysses): each
then holds every token for 1/N of the heads, attends, and swaps back. diffusers does it all
(`ContextParallelConfig`, `transformer.enable_parallelism`); the script only launches one process per GPU.

Use it to make one image faster when the pipeline fits on each GPU (FLUX.1-dev: 31.4 GiB in bfloat16, 22.3 GiB
with --staged). For a model too large for any one GPU, --shard-weights keeps 1/N of the transformer's and of the
largest text encoder's weights on each GPU (PyTorch's FSDP2), gathering each block's just before it runs: every
GPU added takes memory off each, but every step each GPU receives (N-1)/N of the transformer's weights, which only
a link that carries them while the blocks compute can hide (docs/context-parallelism.md: the cost, on paper).
For many images, data-parallelism-accelerate.py is faster still (the GPUs never talk); model-parallelism-flux.py
spreads one copy over the GPUs, which take turns.

    uv run torchrun --nproc-per-node 2 context-parallelism-flux.py                  # 2 GPUs (Intel or NVIDIA)
    uv run accelerate launch --num_processes 2 context-parallelism-flux.py          # the same, with accelerate
    uv run context-parallelism-flux.py                                              # 1 GPU: the baseline
    uv run context-parallelism-flux.py --plan --num-devices 2 --device-memory 24GiB # will it fit? no download
    uv run torchrun --nproc-per-node 3 context-parallelism-flux.py --shard-weights --staged  # FLUX.1-dev, 3 x 16 GB
    uv run torchrun --nproc-per-node 2 context-parallelism-flux.py --model tiny/flux --height 64 --width 64 \
        --num-inference-steps 2                                                     # on the CPU

Launcher options go before the script's name. On the CPU `accelerate launch` needs --multi_gpu to start several
processes. Every process runs the pipeline with the same seed on a CPU generator; only the main process saves the
image, which is the image one process makes alone (to rounding).
"""

import argparse
import contextlib
import gc
import importlib
import inspect
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
import unittest.mock
import warnings
from collections import Counter
from datetime import timedelta
from pathlib import Path

import diffusers
import huggingface_hub
import psutil
import torch
import transformers
from accelerate import PartialState, init_empty_weights
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import compute_module_sizes, convert_file_size_to_int, gather_object
from accelerate.utils.memory import clear_device_cache
from diffusers import AutoencoderKL, ContextParallelConfig, DiffusionPipeline
from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"
DEFAULT_PROMPT = "A cat holding a sign that says hello world"  # the sharding script's: compare image for image
LAUNCHER_FLAGS = ("--num-processes", "--num_processes", "--multi-gpu", "--multi_gpu", "--nproc-per-node",
                  "--nproc_per_node", "--num-machines", "--num_machines", "--machine-rank", "--machine_rank",
                  "--mixed-precision", "--mixed_precision", "--config-file", "--config_file")
GiB = 2**30
RESERVE_AT_1024 = 3 * GiB  # activations at 1024x1024, scaled with the pixels: every process decodes the whole image
TEXT_ENCODER_RESERVE = GiB // 2  # a text encoder reads a few hundred tokens: small activations at any image size
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# --staged calls FLUX.1's encode_prompt; the other pipelines load whole.
STAGED_PIPELINES = ("FluxPipeline",)
# Pipelines whose text encoder does not pad the prompt to --max-sequence-length (FLUX.1's T5 does): QwenImage wraps
# it in a template of its own and keeps only the real tokens; the plan counts them with its tokenizer.
TEMPLATED_PIPELINES = ("QwenImagePipeline",)
# Ring attention merges partial attentions by their log-sum-exp: only these of diffusers' context-parallel backends
# return it (attention_dispatch.py: the native backend raises on return_lse), and they run on NVIDIA GPUs only.
RING_BACKENDS = ("_native_cudnn", "_native_flash")

# diffusers imports transformers' image processors (for IP-Adapters, which this sample never uses), and without
# torchvision transformers warns about them; diffusers 0.42's context parallel hooks call a torch collective that
# torch now calls deprecated, once per process. Silence those warnings alone; the others still show.
logging.getLogger("transformers.utils.import_utils").addFilter(lambda record: "torchvision" not in record.getMessage())
warnings.filterwarnings("ignore", message=r".*all_gather_tensor.* is deprecated", category=FutureWarning)


def main():
    args = parse_args()
    if not args.plan:  # a plan loads nothing and starts no processes: it may be for GPUs this machine lacks
        check_torch_can_use_the_gpus(args.device)  # never hours on the CPU, without a word, on a machine with GPUs
        check_launch(args)  # one process per device, and a torch that can join them into a group
    # Know before loading, from the configs alone (the model built on the meta device, no weights) and the prompt's
    # real token count: that the model can be split this way, how its heads and tokens are shared, what each GPU holds.
    plan = make_plan(args)
    if args.plan:
        return print_plan(args, plan)
    check_plan(args, plan)

    # 1. One process per device, joined into a group (form_the_group): xccl on Intel GPUs, nccl on NVIDIA, with gloo
    #    beside them for small CPU messages; gloo alone on the CPU.
    distributed_state, device = form_the_group(args)
    quiet_libraries(main_process=distributed_state.is_main_process, verbose=args.verbose)
    check_device_memory(args, plan, device)  # each process, its own GPU
    if distributed_state.num_processes == 1 and distributed_state.is_main_process:
        print(one_process_note(device), file=sys.stderr, flush=True)

    # 2. Every process loads the WHOLE pipeline onto its own device (with --staged: the text encoders first,
    #    which encode the prompt and are freed, then the transformer and the VAE). With --shard-weights no process
    #    holds the transformer or the largest text encoder whole: FSDP2 shards them over a 1-D mesh of all N
    #    processes (each holds 1/N of every block's weights, and gathers a block's weights just before it runs),
    #    and the main process alone reads their weights from the disk and sends each process its shard. The mesh
    #    has a process group of its own (every process makes it): on the whole group, the one the attention's
    #    all-to-alls use, each gather would queue with them on one communicator (NCCL, XCCL).
    shard_mesh = DeviceMesh.from_group(torch.distributed.new_group(timeout=timedelta(days=7)), device.type,
                                       mesh_dim_names=("shard",)) if args.shard_weights else None
    inputs = encode_and_free_text_encoders(args, plan, device, shard_mesh) if args.staged else dict(
        prompt=args.prompt)
    pipeline = load_pipeline(args, plan, device, shard_mesh, without=TEXT_ENCODERS if args.staged else ())
    no_fp64_remedy(pipeline, [device], announce=distributed_state.is_main_process)  # FLUX on Intel Arc A-series
    if args.attention_backend != "native":
        pipeline.transformer.set_attention_backend(args.attention_backend)

    # 3. Context parallelism: split the transformer's sequence between the processes, laid out on a device mesh
    #    whose dimensions diffusers names "ring" and "ulysses" (ring x ulysses = N processes).
    if distributed_state.num_processes > 1:
        mesh = init_device_mesh(device.type, (plan["ring_degree"], plan["ulysses_degree"]),
                                mesh_dim_names=("ring", "ulysses"))
        enable_context_parallelism(pipeline, plan, mesh)

    # 4. Generate: every process runs the same call with the same starting noise (a CPU generator, the same seed).
    #    From here on every process makes steps: one that stops for --stall-timeout ends the job (StallWatchdog).
    wait_for_everyone(device)  # every process has loaded: from here on, steps are expected
    watchdog = StallWatchdog(args.stall_timeout, distributed_state.is_main_process, args.num_inference_steps)
    pipeline.set_progress_bar_config(disable=not distributed_state.is_main_process)
    clock = StepClock(device, watchdog)
    image = pipeline(**inputs, height=args.height, width=args.width, generator=torch.Generator("cpu").manual_seed(
        args.seed), callback_on_step_end=clock.step, **call_options(args, pipeline)).images[0]
    clock.stop()

    # 5. The main process saves the image, whole or not at all, and reports every process's numbers.
    stats = gather_object([{"rank": distributed_state.process_index, "device": str(device),
                            "peak": peak_memory_in_words(device), "held": parameters_held(pipeline, plan)}])
    watchdog.close()  # the last collective is over
    if distributed_state.is_main_process:
        save(image, args.output)
        report(args, plan, stats, image, clock)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Hub id or local folder of a pipeline whose transformer diffusers can split by context "
                             "parallelism, for images: FLUX.1, Flux2, QwenImage... (default: %(default)s)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="what to draw (default: %(default)r)")
    parser.add_argument("--height", type=int, default=1024, help="image height in pixels (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1024, help="image width in pixels (default: %(default)s)")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    parser.add_argument("--guidance-scale", type=float, default=3.5, help="guidance (default: %(default)s)")
    parser.add_argument("--max-sequence-length", type=int, default=512,
                        help="the prompt's tokens at most, at most 512 (FLUX.1's T5 pads the prompt to it; QwenImage "
                             "keeps only the prompt's real tokens); the processes split them too (default: "
                             "%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("flux-dev-context-parallel.png"),
                        help="the image, written by the main process (default: %(default)s)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="weights' dtype; auto is bfloat16 on GPUs and float32 on the CPU (default: %(default)s)")
    parser.add_argument("--ulysses-degree", type=int,
                        help="processes that split the heads in each attention with all-to-alls (default: the "
                             "number of processes, divided by --ring-degree)")
    parser.add_argument("--ring-degree", type=int, default=1,
                        help="processes that pass keys and values round a ring instead; needs --attention-backend "
                             f"{' or '.join(RING_BACKENDS)} (NVIDIA GPUs) (default: %(default)s)")
    parser.add_argument("--attention-backend", choices=["native", *RING_BACKENDS], default="native",
                        help="diffusers' attention backend: native is torch's scaled_dot_product_attention, on any "
                             "device; the others return the log-sum-exp that ring attention needs (default: "
                             "%(default)s)")
    parser.add_argument("--shard-weights", action="store_true",
                        help="for a model too big for one GPU: each process holds 1/N of the transformer's and the "
                             "largest text encoder's weights (FSDP2), gathering each block's just before it runs; "
                             "the main process alone reads them from the disk (FLUX.1-dev on 2 x 24 GB, or 3 x 16 "
                             "GB with --staged; Qwen-Image on 4 x 24 GB: --plan tells)")
    parser.add_argument("--staged", action="store_true",
                        help="load the text encoders, encode the prompt, free them, then load the transformer and VAE: "
                             "each GPU holds 9.1 GiB less of FLUX.1-dev at its peak")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: each process on a GPU of its own where torch can use the GPUs, else the CPU; "
                             "cpu: on the CPU on purpose, even on a machine with GPUs (default: %(default)s)")
    parser.add_argument("--stall-timeout", type=int, default=600, metavar="SECONDS",
                        help="once every process has loaded, end the job when no denoising step has finished for "
                             "this long (and 10 times the slowest step): a process that stopped would keep the "
                             "others waiting for a week (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="also show the main process's loading bars")
    parser.add_argument("--plan", action="store_true",
                        help="load no weights, start no processes: print the split and what each GPU must hold")
    parser.add_argument("--json", action="store_true", help="with --plan: print the plan as one JSON document")
    parser.add_argument("--num-devices", type=int,
                        help="with --plan: plan for N processes, one per GPU (default: the GPUs present, or 1)")
    parser.add_argument("--device-memory", metavar="SIZE",
                        help="with --plan: free memory of each planned GPU, e.g. 24GiB (default: that present)")
    args, unknown = parser.parse_known_args()
    for arg in unknown:
        if arg.split("=")[0] in LAUNCHER_FLAGS:
            fail(f"{arg} is an option of the launcher, not of this script: put it before the script's name, "
                 f"e.g. `torchrun --nproc-per-node 2 {Path(__file__).name}`")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for name in ("height", "width", "num_inference_steps", "max_sequence_length", "num_devices", "ulysses_degree",
                 "ring_degree", "stall_timeout"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be a positive number, not {getattr(args, name)}")
    if args.max_sequence_length > 512:
        fail(f"--max-sequence-length {args.max_sequence_length}: FLUX.1's T5 takes at most 512 tokens")
    if not args.plan and (args.json or args.num_devices is not None or args.device_memory is not None):
        fail("--json, --num-devices and --device-memory describe a plan: add --plan")
    if args.device_memory is not None:
        try:
            args.device_memory = convert_file_size_to_int(args.device_memory)
        except ValueError:
            fail(f"--device-memory {args.device_memory}: write a size like 24GiB or 80GB")
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


def make_plan(args):
    """What the run needs, from the model's configs on the meta device (no weights): the split (processes, heads,
    tokens, and whether they divide), the weights of each component, and what each GPU must hold."""
    index, transformer, vae = read_configs(args.model)
    if not index.get("transformer"):
        fail(f"--model {args.model} is a {index.get('_class_name')} with no transformer: context parallelism splits "
             "a transformer's sequence; data-parallelism-accelerate.py serves any pipeline (many images at once)")
    pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
    if pipeline_class is not None and "num_frames" in inspect.signature(pipeline_class.__call__).parameters:
        fail(f"--model {args.model} is a {index['_class_name']}, which makes videos: this script makes one image "
             "(its split counts no frames, and it saves a PNG); a text-to-image pipeline with a context-parallel "
             "plan (FLUX.1, Flux2, QwenImage) runs here")
    transformer_class = getattr(diffusers, index["transformer"][1], None)
    # The model's context-parallel plan, a class attribute (`_cp_plan`) that enable_parallelism reads: which inputs
    # to split and which output to gather. Read here, not called, to say before loading that there is none.
    if getattr(transformer_class, "_cp_plan", None) is None:
        fail(f"--model {args.model} is a {index.get('_class_name')}: diffusers cannot split its transformer "
             f"({index['transformer'][1]}) by context parallelism (it has no context-parallel plan): "
             "data-parallelism-accelerate.py serves it on several GPUs (a whole copy on each, many images at once); "
             "model-parallelism-flux.py shards FLUX.1 pipelines only")
    # The VAE shrinks images 8x (2 per block after the first; QwenImage's: 2 per entry of temperal_downsample), and
    # the pipelines pack 2x2 latents into one token: an image token is a 16x16 patch of pixels, and sizes must be
    # multiples of 16.
    scale = 2 ** (len(vae["temperal_downsample"]) if "temperal_downsample" in vae else
                  len(vae.get("block_out_channels", [0] * 4)) - 1)
    patch = scale * 2
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value % patch:
            fail(f"{flag} {value} does not suit {args.model}: use a multiple of {patch}, "
                 f"e.g. {max(patch, value // patch * patch)}")

    if not args.plan:  # the processes the launcher started (a plain run is one)
        processes = int(os.environ.get("WORLD_SIZE", "1"))
    else:  # --num-devices, or one process per GPU present
        processes = args.num_devices or (torch.accelerator.device_count() if args.device != "cpu" and (
            torch.accelerator.is_available()) else 1)
    ulysses = args.ulysses_degree or max(1, processes // args.ring_degree)
    heads = transformer.get("num_attention_heads")
    image_tokens = (args.height // patch) * (args.width // patch)
    text_tokens = prompt_tokens(args, index)
    # Where the processes do not divide the tokens or the heads, diffusers' ulysses_anything splits them unevenly
    # (the first processes take one token more) and pads the heads (Ulysses alone: not with ring attention).
    uneven = processes > 1 and bool(image_tokens % processes or text_tokens % processes or heads % ulysses)
    can_stage = index.get("_class_name") in STAGED_PIPELINES
    dtype = run_dtype(args)
    components = weigh_components(args.model, index, dtype)
    text = sum(components.get(name, 0) for name in TEXT_ENCODERS)
    weights = sum(components.values())
    reserve = int(RESERVE_AT_1024 * args.height * args.width / 1024**2)
    needs = {"whole": weights + reserve}  # every component at once, while the VAE decodes
    if can_stage:  # --staged: the text encoders alone (and freed), then the transformer and the VAE
        needs["staged"] = max(text + TEXT_ENCODER_RESERVE, weights - text + reserve)
    sharded, shard_problems = plan_shards(args, index, dtype, components, processes) if args.shard_weights else (
        {}, [])
    if sharded:  # each process holds its shards, the other components whole, and what it gathers at most
        shares = {name: s["share"] for name, s in sharded.items()}
        needs["sharded"] = sharded_need(components, sharded, shares, reserve, staged=False)
        if can_stage:
            needs["sharded_staged"] = sharded_need(components, sharded, shares, reserve, staged=True)
    on_gpu = args.device_memory is not None or (args.device != "cpu" and torch.accelerator.is_available())
    return {"model": args.model, "pipeline": index.get("_class_name"), "transformer": index["transformer"][1],
            "processes": processes, "ring_degree": args.ring_degree, "ulysses_degree": ulysses, "heads": heads,
            "height": args.height, "width": args.width, "patch": patch, "image_tokens": image_tokens,
            "text_tokens": text_tokens, "ulysses_anything": uneven and args.ring_degree == 1,
            # the most any process holds: the first processes take one token more where the split is uneven
            "tokens_per_process": -(-image_tokens // processes) - (-text_tokens // processes),
            "heads_per_process": -(-heads // ulysses) if heads else None,
            "dtype": str(dtype).removeprefix("torch."), "components": components, "weights": weights,
            "text_encoders": text, "reserved_for_activations": reserve, "needs": needs, "staged": args.staged,
            "can_stage": can_stage, "device": "GPU" if on_gpu else "cpu", "shard_weights": args.shard_weights,
            "sharded": sharded,
            "problems": split_problems(args, processes, ulysses, heads, image_tokens, text_tokens, patch, uneven) + (
                [f"--staged is for FLUX.1 pipelines; {args.model} is a {index.get('_class_name')}"]
                if args.staged and not can_stage else []) + shard_problems}


def read_configs(model):
    """model_index.json and the transformer's and VAE's config.json: a few kilobytes."""
    path = Path(model).expanduser()
    if path.exists() and not (path / "model_index.json").exists():
        fail(f"--model {model} is not a diffusers pipeline folder: it has no model_index.json")
    if not path.exists() and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model):
        fail(f"--model {model}: no such folder, and not a Hub id (organisation/name)")
    diffusers.utils.logging.set_verbosity_error()  # a failed Hub look-up is said once, by us, not three times
    huggingface_hub.utils.logging.set_verbosity_error()
    with explained_load_errors(model), warnings.catch_warnings(action="ignore"):
        index = DiffusionPipeline.load_config(model)
        transformer = AutoencoderKL.load_config(model, subfolder="transformer") if index.get("transformer") else {}
        vae = AutoencoderKL.load_config(model, subfolder="vae") if index.get("vae") else {}
    diffusers.utils.logging.set_verbosity_warning()  # from here on, the libraries' warnings show again
    huggingface_hub.utils.logging.set_verbosity_warning()
    return index, transformer, vae


def prompt_tokens(args, index):
    """The prompt's tokens as the transformer gets them, which the processes split. FLUX.1's T5 pads the prompt to
    --max-sequence-length. QwenImage's pipeline wraps the prompt in its template, drops the template's first tokens
    and pads nothing: count them with its own tokenizer and template (the tokenizer alone is loaded, no weights);
    in a folder of configs alone (no tokenizer), at --max-sequence-length, the most they can be."""
    if index.get("_class_name") not in TEMPLATED_PIPELINES:
        return args.max_sequence_length
    if Path(args.model).expanduser().is_dir() and not (Path(args.model).expanduser() / "tokenizer").is_dir():
        return args.max_sequence_length  # a folder of configs alone (tests/fixtures): the most the prompt can be
    weights = {name: None for name, spec in index.items() if isinstance(spec, list) and name != "tokenizer"}
    diffusers.utils.logging.disable_progress_bar()  # a bar for one tokenizer: no
    with explained_load_errors(args.model), warnings.catch_warnings(action="ignore"):
        tokenizer_only = DiffusionPipeline.from_pretrained(args.model, **weights)
    diffusers.utils.logging.enable_progress_bar()
    drop = tokenizer_only.prompt_template_encode_start_idx  # the pipeline's _get_qwen_prompt_embeds, counted
    ids = tokenizer_only.tokenizer(tokenizer_only.prompt_template_encode.format(args.prompt), truncation=True,
                                   max_length=tokenizer_only.tokenizer_max_length + drop).input_ids
    return min(len(ids) - drop, args.max_sequence_length)


def split_problems(args, processes, ulysses, heads, image_tokens, text_tokens, patch, uneven):
    """Why these processes cannot split this model's attention and sequence: one line each, with sizes that work."""
    problems = []
    if args.ring_degree * ulysses != processes:
        problems.append(f"--ring-degree {args.ring_degree} x --ulysses-degree {ulysses} must be the number of "
                        f"processes, {processes}")
    if args.ring_degree > 1 and args.device == "cpu" or args.ring_degree > 1 and args.device_memory is None and (
            not torch.accelerator.is_available()):
        problems.append("ring attention (--ring-degree) merges partial attentions by their log-sum-exp, which the "
                        "native attention, the only one on the CPU, does not return: use --ulysses-degree (the "
                        "default) on the CPU")
    elif args.ring_degree > 1 and args.attention_backend not in RING_BACKENDS:
        problems.append(f"ring attention (--ring-degree) needs an attention that returns its log-sum-exp, which the "
                        f"{args.attention_backend} one does not: add --attention-backend {RING_BACKENDS[0]} (NVIDIA "
                        "GPUs), or use --ulysses-degree alone")
    elif args.ring_degree > 1 and torch.accelerator.is_available() and (
            torch.accelerator.current_accelerator().type != "cuda"):
        problems.append(f"ring attention's backends ({', '.join(RING_BACKENDS)}) run on NVIDIA GPUs only: use "
                        "--ulysses-degree alone")
    if processes == 1 or not uneven:
        return problems
    if args.ring_degree > 1:  # ring attention: every process must hold as many tokens and heads as the others
        problems += even_split_problems(args, processes, ulysses, heads, image_tokens, text_tokens, patch)
        return problems
    # Ulysses anything (diffusers' ulysses_anything): any token counts, at least one token each; the heads are padded
    # to a multiple of the processes, with fewer padding heads than each process gets (attention_dispatch.py).
    if heads and not heads_can_be_padded(heads, ulysses):
        works = [n for n in range(2, heads + 1) if heads_can_be_padded(heads, n)]
        problems.append(f"{heads} attention heads cannot be shared between {ulysses} processes (Ulysses gives each "
                        f"process heads/{ulysses}, padded up to a whole number only with fewer padding heads than "
                        f"real ones each): run {', '.join(map(str, works)) or 'one'} process(es)")
    for tokens, what in ((image_tokens, f"a {args.height}x{args.width} image is"), (text_tokens, "the prompt is")):
        if tokens < processes:
            problems.append(f"{what} {tokens} tokens, fewer than the {processes} processes that would share them: "
                            "run fewer processes, or make a larger image or a longer prompt")
    return problems


def even_split_problems(args, processes, ulysses, heads, image_tokens, text_tokens, patch):
    """With ring attention (no ulysses_anything) the processes must divide the heads and both kinds of tokens."""
    problems = []
    ring = " (with --ring-degree 1, Ulysses alone, any size runs)"
    if heads and heads % ulysses:  # the process counts that share the heads and both kinds of tokens evenly
        works = [n for n in range(2, heads + 1) if heads % n == 0 and image_tokens % n == 0 and text_tokens % n == 0]
        problems.append(f"{heads} attention heads cannot be shared between {ulysses} processes (Ulysses gives each "
                        f"process heads/{ulysses}): at this size run {', '.join(map(str, works)) or 'one'} "
                        f"process(es){ring}")
    if image_tokens % processes:
        height = next(h for h in range(args.height + patch, 100 * args.height, patch)
                      if (h // patch) * (args.width // patch) % processes == 0)
        problems.append(f"a {args.height}x{args.width} image is {image_tokens} tokens ({args.height // patch} x "
                        f"{args.width // patch} patches of {patch}x{patch} pixels), which {processes} processes "
                        f"cannot share evenly: use e.g. --height {height}{ring}")
    if text_tokens % processes:
        below = text_tokens // processes * processes
        problems.append(f"the prompt is {text_tokens} tokens, which {processes} processes cannot share evenly: use "
                        f"--max-sequence-length {below or processes} (or a prompt of that many tokens){ring}")
    return problems


def plan_shards(args, index, dtype, components, processes):
    """--shard-weights, from the configs alone (the components built with no weights): which components are sharded
    (the transformer and the largest text encoder), and for each what one process holds (its largest shard: FSDP2
    cuts every weight in N along its first dimension, the first processes taking a row more where N does not
    divide it) and what it gathers at most at once: its own weights outside the groups (the embedders, the last
    norm and projection), gathered for the whole call, and the largest of its groups (shard_units) twice over, the
    block that runs and the next one, prefetched (a group outside the block lists, such as Qwen2.5-VL's output
    head, once). Returns those figures by component, and the problems (one line each)."""
    texts = [name for name in TEXT_ENCODERS if name in components]
    names = ["transformer", *([max(texts, key=components.get)] if texts else [])]
    sharded, problems = {}, []
    if processes == 1:
        problems.append("--shard-weights shares the weights between processes, and one process holds them all: "
                        f"launch 2 or more (`torchrun --nproc-per-node 2 {Path(sys.argv[0]).name} ...`), or leave "
                        "--shard-weights out")
    itemsize = torch.tensor([], dtype=dtype).element_size()
    for name in names:
        module = empty_component(args.model, index, name)
        # Under float16 transformers keeps the layers a model names in `_keep_in_fp32_modules` in float32 (T5's `wo`),
        # as weigh_components counts them: each weight at the dtype it is loaded in, and shared in.
        keep = set(getattr(type(module), "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else set()
        units = shard_units(module)
        if not units:
            problems.append(f"--shard-weights: {name} ({type(module).__name__}) names no blocks for FSDP to gather one "
                            "at a time (its class has no _no_split_modules): leave --shard-weights out, or use "
                            "model-parallelism-flux.py (FLUX.1)")
            continue
        unit_names = {unit_name: unit for unit_name, unit in module.named_modules() if unit in units}
        own, per_unit, share, total = 0, Counter(), 0, 0
        for parameter_name, parameter in module.named_parameters():
            owner = max((u for u in unit_names if parameter_name.startswith(u + ".")), key=len, default=None)
            bytes_ = parameter.numel() * (4 if set(parameter_name.split(".")) & keep else itemsize)
            total += bytes_
            rows = parameter.shape[0] if parameter.dim() else 1
            share += -(-rows // processes) * (bytes_ // rows)  # the first processes' shard, the largest
            if owner is None:
                own += bytes_
            else:
                per_unit[owner] += bytes_
        chained = {id(block) for order in block_orders(module, units) for block in order}
        largest = max(per_unit, key=lambda u: per_unit[u] * (2 if id(unit_names[u]) in chained else 1))
        times = 2 if id(unit_names[largest]) in chained else 1
        sharded[name] = {"bytes": total, "share": share, "groups": len(units), "largest_group": largest,
                         "largest_group_class": type(unit_names[largest]).__name__,
                         "largest_group_bytes": per_unit[largest], "prefetched": times == 2, "own": own,
                         "gathered": own + times * per_unit[largest]}
    return sharded, problems


def sharded_need(components, sharded, shares, reserve, staged):
    """What one process holds at its busiest with --shard-weights: its share of each sharded component (`shares`),
    the other components whole, the most it gathers at once (one sharded component runs at a time), and the
    activations' reserve; with --staged, the busier of the two stages."""
    def stage(names):
        return sum(shares.get(name, components[name]) for name in names) + max(
            [sharded[name]["gathered"] for name in names if name in sharded], default=0)
    text = [name for name in components if name in TEXT_ENCODERS]
    if not staged:
        return stage(components) + reserve
    return max(stage(text) + TEXT_ENCODER_RESERVE, stage([name for name in components if name not in text]) + reserve)


def fewest_processes(plan, device_memory, staged):
    """The fewest processes (one per GPU of `device_memory`) that hold the pipeline with --shard-weights, each a
    1/N shard; None where even the parts every GPU holds whole do not fit."""
    for n in range(2, 257):
        shares = {name: -(-s["bytes"] // n) for name, s in plan["sharded"].items()}
        if sharded_need(plan["components"], plan["sharded"], shares, plan["reserved_for_activations"],
                        staged) <= device_memory:
            return n
    return None


def fit(plan, device_memory, ram=None, processes_here=1):
    """Whether each GPU (or, on the CPU, the RAM of this machine's processes) can hold what the run needs, and the
    one line that says what to do where it cannot."""
    mode = ("sharded_" if plan["shard_weights"] else "") + ("staged" if plan["staged"] else "whole")
    if mode.replace("sharded_whole", "sharded") not in plan["needs"]:  # --shard-weights, and nothing can be sharded:
        return False, None  # plan["problems"] says why, in one line
    need = plan["needs"][mode.replace("sharded_whole", "sharded")]
    if plan["device"] == "cpu":  # every process holds a copy in RAM (or its shards, and process 0 reads each whole)
        need, device_memory = need * processes_here + max(
            [s["bytes"] for s in plan["sharded"].values()], default=0), ram
    if need <= device_memory:
        return True, None
    if plan["device"] == "cpu":
        held = "its shards and the rest" if plan["shard_weights"] else "a copy each"
        return False, (f"{plan['model']} does not fit: {processes_here} process(es) on the CPU need {size(need)} of "
                       f"RAM, {held}, and {size(device_memory)} is free: run fewer processes, or free some memory")
    if plan["shard_weights"]:
        return False, sharded_does_not_fit(plan, need, device_memory)
    where = (f"each GPU holds the whole pipeline: it needs {size(need)} "
             f"({size(plan['weights'] - (plan['text_encoders'] if plan['staged'] else 0))} of weights, "
             f"{size(plan['reserved_for_activations'])} for activations) and has {size(device_memory)} free")
    if not plan["staged"] and plan["can_stage"] and plan["needs"]["staged"] <= device_memory:
        return False, (f"{plan['model']} does not fit: {where}: add --staged (the text encoders encode the prompt "
                       f"and are freed first: {size(plan['text_encoders'])} less per GPU)")
    return False, (f"{plan['model']} does not fit: {where}" + ("" if plan["staged"] or not plan["can_stage"] else
                   f", even with --staged ({size(plan['needs']['staged'])})")
                   + ": add --shard-weights (each GPU then holds 1/N of the transformer and of the largest text "
                   "encoder: --plan --shard-weights tells what fits), or model-parallelism-flux.py spreads one copy "
                   "over several GPUs for a model too large for any one of them; or make smaller images")


def sharded_does_not_fit(plan, need, device_memory):
    """The line for --shard-weights on GPUs that cannot hold their shards: --staged where that fits, else the fewest
    GPUs of this size that can."""
    where = (f"each of {plan['processes']} GPUs holds its shards: it needs {size(need)} and has "
             f"{size(device_memory)} free")
    if not plan["staged"] and plan["can_stage"] and plan["needs"]["sharded_staged"] <= device_memory:
        return (f"{plan['model']} does not fit: {where}: add --staged (the text encoders encode the prompt and are "
                f"freed first: {size(plan['needs']['sharded_staged'])})")
    fewest = fewest_processes(plan, device_memory, plan["staged"])
    if fewest is None:
        return (f"{plan['model']} does not fit: {where}, and even the parts every GPU holds whole and the blocks it "
                "gathers leave no room on GPUs of this size: make smaller images, or use larger GPUs")
    return f"{plan['model']} does not fit: {where}: run {fewest} processes or more, one per GPU of this size"


def print_plan(args, plan):
    """--plan: the split, and whether each GPU can hold what it must, without loading anything."""
    where, memory = plan_memory(args)
    here = plan["processes"] if plan["device"] == "cpu" else 1
    fits, why = fit(plan, memory, memory, here)
    plan = {**plan, "device_memory": memory, "fits": fits and not plan["problems"],
            "problems": plan["problems"] + ([why] if why else [])}
    if args.json:
        print(json.dumps(plan, indent=2))
        return
    n = plan["processes"]
    print(f"plan for {args.model} in {plan['dtype']}, {args.height}x{args.width}, {n} process(es), one per "
          f"{'GPU' if plan['device'] != 'cpu' else 'CPU process'}, on {where} with {size(memory)} free:")
    up_to = "up to " if plan["ulysses_anything"] else ""
    print(f"  split: {plan['image_tokens']} image tokens + {plan['text_tokens']} prompt tokens = "
          f"{plan['image_tokens'] + plan['text_tokens']}, {up_to}{plan['tokens_per_process']} per process; "
          f"{plan['heads']} heads, {up_to}{plan['heads_per_process']} per process in each attention "
          f"(ring {plan['ring_degree']} x ulysses {plan['ulysses_degree']})"
          + (": uneven, by diffusers' ulysses_anything" if plan["ulysses_anything"] else ""))
    for name, b in sorted(plan["components"].items(), key=lambda item: item[1], reverse=True):
        print(f"  {name:<16} {size(b):>10}")
    print(f"  {'weights':<16} {size(plan['weights']):>10}, and {size(plan['reserved_for_activations'])} kept free for "
          "activations, on every GPU")
    print(f"  whole pipeline on each GPU:  needs {size(plan['needs']['whole'])}")
    if plan["can_stage"]:  # a saving, or none (text encoders smaller than what encoding keeps free for itself)
        saved = plan["needs"]["whole"] - plan["needs"]["staged"]
        print(f"  --staged (text encoders freed after encoding): needs {size(plan['needs']['staged'])}, "
              + (f"{size(saved)} less" if saved > 0 else "no less"))
    if plan["sharded"]:
        print_shards(plan, memory)
    for problem in plan["problems"]:
        print(f"  NO: {problem}")
    print(f"  fits: {'yes' if plan['fits'] else 'NO'}")


def print_shards(plan, memory):
    """--plan --shard-weights: what each GPU holds of each sharded component, what it gathers, what it needs."""
    n = plan["processes"]
    print(f"  --shard-weights, 1/{n} of these on each GPU (FSDP2), each block's weights gathered just before it runs:")
    for name, s in plan["sharded"].items():
        print(f"    {name:<14} {size(s['share']):>10} of {size(s['bytes'])}; gathers at most {size(s['gathered'])}: "
              + (f"two {s['largest_group_class']} of {size(s['largest_group_bytes'])} (one runs, the next is "
                 "prefetched)" if s["prefetched"] else f"its {s['largest_group']} ({size(s['largest_group_bytes'])})")
              + (f" and {size(s['own'])} outside its blocks" if s["own"] else ""))
    whole = [name for name in plan["components"] if name not in plan["sharded"]]
    shares = sum(s["share"] for s in plan["sharded"].values())
    print(f"    {'whole':<14} {size(sum(plan['components'][name] for name in whole)):>10} ({', '.join(whole)})")
    print(f"  sharded, each GPU needs {size(plan['needs']['sharded'])} ({size(shares)} of shards, the rest whole, the "
          f"gathered blocks, {size(plan['reserved_for_activations'])} for activations)")
    if "sharded_staged" in plan["needs"]:
        print(f"  sharded and --staged: needs {size(plan['needs']['sharded_staged'])}")
    for staged in (False, True) if "sharded_staged" in plan["needs"] else (False,):
        fewest = fewest_processes(plan, memory, staged)
        print(f"  the fewest GPUs of {size(memory)} that hold it sharded{' and --staged' if staged else ''}: "
              + (str(fewest) if fewest else "none (make smaller images)"))
    whole_read = max(s["bytes"] for s in plan["sharded"].values())
    print(f"  host RAM while loading, the {n} processes on one machine: process 0 reads each sharded component whole, "
          f"one at a time, and sends the shards ({size(whole_read)} at most); each process reads the components it "
          f"holds whole ({size(sum(plan['components'][name] for name in whole))}): "
          f"{size(host_ram_while_loading(plan, n))} at most")


def check_plan(args, plan):
    """Before any process loads anything: a split the processes cannot make is one line, and a non-zero exit."""
    if plan["problems"]:
        fail(plan["problems"][0])
    if plan["device"] == "cpu":  # every process of this machine keeps a copy of the weights in RAM
        fits, why = fit(plan, None, psutil.virtual_memory().available, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if not fits:
            fail(why, code=1)
    elif plan["sharded"]:  # GPUs: this machine's RAM while its processes load, before they send it to their GPUs
        here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        # The machine of process 0 (whose processes' local ranks are their ranks) also holds process 0's whole read.
        process_0_here = os.environ.get("RANK", "0") == os.environ.get("LOCAL_RANK", "0")
        ram = host_ram_while_loading(plan, here, process_0_here)
        if ram > psutil.virtual_memory().available:
            largest = max(plan["sharded"], key=lambda name: plan["sharded"][name]["bytes"])
            whole = [name for name in plan["components"] if name not in plan["sharded"]]
            fail(f"--shard-weights: loading needs {size(ram)} of this machine's RAM ("
                 + (f"process 0 reads the {largest} whole into RAM before it sends each process its shard, "
                    f"{size(plan['sharded'][largest]['bytes'])}; " if process_0_here else "")
                 + f"each of its {here} process(es) reads {', '.join(whole) or 'nothing else'} whole, "
                 f"{size(sum(plan['components'][name] for name in whole))}), and it has "
                 f"{size(psutil.virtual_memory().available)} free: free some memory", code=1)


def host_ram_while_loading(plan, processes_here, process_0_here=True):
    """The RAM of a machine whose processes load with --shard-weights on GPUs: process 0 reads each sharded
    component whole (from_pretrained on the CPU), one at a time, the largest at most; and each process reads the
    components it holds whole, through RAM, before it moves them to its GPU. Counted together, though the whole
    components are read after the sharded ones are sent; not counted: each process's own memory (Python, the
    libraries)."""
    whole = sum(b for name, b in plan["components"].items() if name not in plan["sharded"])
    return (max(s["bytes"] for s in plan["sharded"].values()) if process_0_here else 0) + processes_here * whole


def one_process_note(device):
    """A single process makes the image alone, with no parallelism: the baseline. Say how to launch N."""
    devices = torch.accelerator.device_count() if device.type != "cpu" else 0
    n = devices if devices > 1 else 2
    command = " ".join([f"uv run torchrun --nproc-per-node {n} {Path(sys.argv[0]).name}", *map(shlex.quote,
                                                                                                sys.argv[1:])])
    where = f"this machine has {devices} {torch.accelerator.current_accelerator().type} devices" if devices > 1 else (
        "one process")
    return (f"note: {where}: this process makes the image alone, with no parallelism (the baseline); `{command}` "
            f"splits it between {n} processes" + (" (on the CPU: `accelerate launch --multi_gpu`, or torchrun)"
                                                  if not devices else ""))


def check_device_memory(args, plan, device):
    """Each process, on its own GPU: the whole pipeline (or its busiest stage with --staged), plus activations."""
    if device.type == "cpu":
        return
    fits, why = fit(plan, free_memory(device))
    if not fits:
        fail(f"{device}: {why}", code=1, every_process=True)


def load_pipeline(args, plan, device, shard_mesh=None, without=()):
    """The pipeline at the run's dtype on this process's device, without the components named (None: not loaded).
    With a shard mesh (--shard-weights), its sharded components are loaded first, sharded (load_sharded), and handed
    to from_pretrained, which loads only the others."""
    sharded = {name: load_sharded(args, plan, name, shard_mesh, device)
               for name in plan["sharded"] if name not in without} if shard_mesh else {}
    left_out = {name: None for name in without} | (  # the tokenizers go with the text encoders
        {"tokenizer": None, "tokenizer_2": None} if "text_encoder" in without else {})
    with explained_load_errors(args.model):
        pipeline = DiffusionPipeline.from_pretrained(args.model, dtype=getattr(torch, plan["dtype"]), **left_out,
                                                     **sharded)
    return pipeline.to(device)


def encode_and_free_text_encoders(args, plan, device, shard_mesh=None):
    """--staged: the text encoders alone encode the prompt, and are freed before the transformer is loaded."""
    text = load_pipeline(args, plan, device, shard_mesh, without=("transformer", "vae"))
    with torch.no_grad():
        prompt_embeds, pooled_prompt_embeds, _ = text.encode_prompt(
            prompt=args.prompt, prompt_2=None, device=device, max_sequence_length=args.max_sequence_length)
    del text  # drop every reference to their weights, then give the memory back
    clear_device_cache(garbage_collection=True)
    return dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)


def load_sharded(args, plan, name, mesh, device):
    """One component of the pipeline (the transformer, a text encoder), sharded over the processes of `mesh`, a 1-D
    mesh of the whole group, with FSDP2, its weights read from the disk once. Process 0 alone reads them, whole,
    into RAM (from_pretrained on the CPU). Every process builds the component from its config with no weights
    (accelerate's init_empty_weights: its parameters on the meta device, but what the config computes, rotary
    tables and position ids, real), shards it (shard_weights), makes room on its device for its own shards
    (to_empty), and receives them from process 0 one weight at a time (torch.distributed.checkpoint's
    set_model_state_dict, broadcast_from_rank0). Process 0 also sends the dtype it loaded each weight in, and the
    buffers that no state dict carries (Qwen2.5-VL's inv_freq, CLIP's position_ids), as it loaded them: the
    component is then the one from_pretrained loads, sharded."""
    index = DiffusionPipeline.load_config(args.model)
    loaded = None
    if torch.distributed.get_rank() == 0:
        library, class_name = index[name]
        cls = getattr(importlib.import_module(library), class_name)
        with explained_load_errors(args.model):
            loaded = cls.from_pretrained(args.model, subfolder=name, dtype=getattr(torch, plan["dtype"]))
    sent = [{"dtypes": {n: p.dtype for n, p in loaded.named_parameters(remove_duplicate=False)},
             "buffers": dict(loaded.named_buffers(remove_duplicate=False))} if loaded is not None else None]
    torch.distributed.broadcast_object_list(sent, src=0)  # a few names and small tensors
    component = empty_component(args.model, index, name)
    names, cast = {id(p): n for n, p in component.named_parameters()}, {}
    for module in component.modules():  # each weight in the dtype process 0 loaded it in (a tied weight stays tied)
        for parameter_name, parameter in list(module.named_parameters(recurse=False)):
            if id(parameter) not in cast:
                cast[id(parameter)] = torch.nn.Parameter(parameter.to(sent[0]["dtypes"][names[id(parameter)]]),
                                                         requires_grad=False)
            setattr(module, parameter_name, cast[id(parameter)])
    shard_weights(component, mesh)
    component.to_empty(device=device)  # this process's shards, allocated on its device, not yet filled
    set_model_state_dict(component, loaded.state_dict() if loaded is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer_name, buffer in sent[0]["buffers"].items():
        owner, _, attribute = buffer_name.rpartition(".")
        setattr(component.get_submodule(owner), attribute, buffer.to(device))
    del loaded, sent  # process 0's whole copy
    gc.collect()
    return component.eval()


def empty_component(model, index, name):
    """A component of the pipeline built from its config.json with no weights (parameters on the meta device, as
    from_pretrained builds it before it reads them), its buffers and other tensors computed as the config says."""
    library, class_name = index[name]
    cls = getattr(importlib.import_module(library), class_name)
    with explained_load_errors(model), warnings.catch_warnings(action="ignore"), init_empty_weights(
            include_buffers=False):
        if issubclass(cls, diffusers.ModelMixin):
            return cls.from_config(cls.load_config(model, subfolder=name))
        component = cls(transformers.AutoConfig.from_pretrained(model, subfolder=name))
    component.tie_weights()  # init_empty_weights makes each weight anew, a tied one too (T5's embedding): tie again
    return component


def shard_units(module):
    """The groups of weights that FSDP gathers one at a time, in the order they run: the model's blocks (its
    `_no_split_modules`: the layers Accelerate never cuts between devices, 57 in FLUX.1's transformer, 24 in T5),
    and, in a text encoder, the token embedding and the output head where their weights are not tied (each 1 GiB in
    Qwen2.5-VL: left to the model's own group, they would stay gathered for its whole call). The rest (the
    embedders, the final norm and projection) is the model's own group."""
    names = set(getattr(module, "_no_split_modules", None) or [])
    units = [m for m in module.modules() if names & {c.__name__ for c in type(m).__mro__}]  # FSDP's subclasses too
    if isinstance(module, transformers.PreTrainedModel) and units:
        holders = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
        units += [m for m in (module.get_input_embeddings(), module.get_output_embeddings())  # not tied to another
                  if m is not None and m not in units and holders[id(m.weight)] == 1]  # (T5's is the encoder's too)
    return units


def shard_weights(component, mesh):
    """FSDP2 on a component: each block (shard_units) a group of its own, then the rest with the component itself;
    every weight cut along its first dimension between the processes of the 1-D `mesh` (a 2-D mesh would make FSDP
    replicate along one dimension: HSDP). reshard_after_forward=True: a block's gathered weights are freed as soon
    as it has run (the component itself too, whose forward is the pipeline's call). Each block names the next block
    of its list for FSDP to prefetch (set_modules_to_forward_prefetch): in torch's words, the same overlap as FSDP's
    default, the gather issued earlier from the CPU. What overlaps a gather with the compute is FSDP's all-gather
    stream, on a GPU; on the CPU, gloo's gathers block the process, and nothing overlaps."""
    units = shard_units(component)
    for unit in reversed(units):  # bottom-up: a group takes the weights no group below it took
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(component, mesh=mesh, reshard_after_forward=True)
    for order in block_orders(component, units):
        for block, following in zip(order, order[1:]):
            block.set_modules_to_forward_prefetch([following])
    return component


def block_orders(component, units):
    """The blocks in the order they run: each parent's lists of blocks (nn.ModuleList), one after the other (FLUX's
    19 double-stream blocks, then its 38 single-stream ones)."""
    orders = []
    for parent in component.modules():
        order = [block for blocks in parent.children() if isinstance(blocks, torch.nn.ModuleList) and len(blocks)
                 and all(block in units for block in blocks) for block in blocks]
        if order:
            orders.append(order)
    return orders


def parameters_held(pipeline, plan):
    """{component: [the parameters this process holds, all of them]} for each sharded component still loaded."""
    held = {}
    for name in plan["sharded"]:
        component = getattr(pipeline, name, None)
        if component is not None:
            parameters = list(component.parameters())
            held[name] = [sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in parameters),
                          sum(p.numel() for p in parameters)]
    return held


def call_options(args, pipeline):
    """Guidance and the prompt's length, where the pipeline takes them (FLUX.1 does)."""
    takes = inspect.signature(pipeline.__call__).parameters
    return {name: value for name, value in (("num_inference_steps", args.num_inference_steps),
                                            ("guidance_scale", args.guidance_scale),
                                            ("max_sequence_length", args.max_sequence_length)) if name in takes}


def report(args, plan, stats, image, clock):
    n = len(stats)
    up_to = "up to " if plan["ulysses_anything"] else ""
    print(f"split: {plan['image_tokens']} image tokens + {plan['text_tokens']} prompt tokens between {n} "
          f"process(es): {up_to if n > 1 else ''}"
          f"{plan['tokens_per_process'] if n > 1 else plan['image_tokens'] + plan['text_tokens']} tokens per process"
          + (f", {up_to}{plan['heads_per_process']} of {plan['heads']} heads each in every attention" if n > 1 else "")
          + (" (uneven: ulysses_anything)" if n > 1 and plan["ulysses_anything"] else ""))
    for name in plan["sharded"]:  # what each process really held (a staged run's text encoder is gone by now)
        held = [s["held"][name] for s in stats if name in s["held"]]
        if held:
            print(f"weights sharded: {name}: each process held at most {max(h[0] for h in held)} of its "
                  f"{held[0][1]} parameters ({max(h[0] for h in held) / held[0][1]:.2f}), the main process alone "
                  "read them from the disk")
    print(f"made {args.output} ({image.width}x{image.height}) in {clock.seconds:.2f} s, {clock.per_step():.3f} s per "
          f"step, {time.time() - psutil.Process().create_time():.1f} s since the start; peak memory: "
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


# Copied from data-parallelism-accelerate.py::process_device
def process_device(distributed_state):
    """This process's device. In a CPU process group Accelerate says "cpu:0": moving the weights from "cpu" to
    "cpu:0" would copy every one of them, twice the memory for nothing."""
    device = distributed_state.device
    return torch.device("cpu") if device.type == "cpu" else device


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


def wait_for_everyone(device):
    """Wait until every process of the group is here (a barrier), on this process's own device. Accelerate's
    wait_for_everyone names the device of the local rank (cuda:1 for local rank 1) wherever torch can use a GPU:
    not the device of a process whose GPU a mask renumbered (each process sees its one GPU as device 0), and a GPU
    for processes on the CPU too (--device cpu on a machine with GPUs). On the CPU this names none: torch then
    takes the group's CPU backend, gloo."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier(device_ids=None if device.type == "cpu" else [device.index])


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


def heads_can_be_padded(heads, n):
    """Whether Ulysses anything can share `heads` between `n` processes: diffusers pads them to a multiple of n
    only where the padding is less than the heads each process gets (_maybe_pad_qkv_head)."""
    return heads % n == 0 or n - heads % n < -(-heads // n)


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
        fail(f"rank {state.process_index} ran out of memory on {state.device}: try --staged, a smaller "
             "--height/--width, or --shard-weights for a model too large for one GPU; --plan shows what fits",
             code=1, every_process=True)
    finally:  # every way out, fail() and SIGTERM included, leaves the process group first
        end_process_group()
