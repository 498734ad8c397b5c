"""Data parallelism: every GPU holds a whole copy of the pipeline and makes its own share of the images.

Use it when the model fits on one device and you have many prompts: N devices make N images at a time.
Hugging Face Accelerate does the set-up: `PartialState` starts one process per device and gives each its
device, and `split_between_processes` hands each process its share of the prompts. Every prompt is made
exactly once, and prompt i always gets the same picture (its seed is --seed + i), however many processes run.

    uv run accelerate launch --num_processes 2 data-parallelism-accelerate.py        # 2 GPUs (Intel or NVIDIA)
    uv run torchrun --nproc-per-node 2 data-parallelism-accelerate.py                 # the same, with torchrun
    uv run accelerate launch --multi_gpu --num_processes 2 data-parallelism-accelerate.py --model tiny/sd3  # CPU

Launcher options (--num_processes, --multi_gpu, ...) go *before* the script's name: what comes after it is
handed to the script. The images land in --output-dir as 000-<prompt>.png, 001-..., with manifest.jsonl.
Running the same command again makes only the images that are missing.
"""

import argparse
import inspect
import json
import os
import re
import shlex
import signal
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import diffusers
import psutil
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from diffusers import AutoencoderKL, DiffusionPipeline
from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
DEFAULT_PROMPTS = [
    "a dog in a field of sunflowers, golden hour",
    "a lighthouse on a cliff in a storm, oil painting",
    "a red fox in fresh snow, wildlife photograph",
    "a bowl of ramen on a wooden table, studio lighting",
]
LAUNCHER_FLAGS = ("--num-processes", "--num_processes", "--multi-gpu", "--multi_gpu", "--nproc-per-node",
                  "--nproc_per_node", "--num-machines", "--num_machines", "--machine-rank", "--machine_rank",
                  "--mixed-precision", "--mixed_precision", "--config-file", "--config_file")


def main():
    args = parse_args()
    check_torch_can_use_the_gpus(args.device)  # never hours on the CPU, without a word, on a machine with GPUs
    check_launch(args)  # one process per device, and a torch that can join them into a group
    prompts = read_prompts(args)
    check_model(args)  # fail now, not after every process has loaded 16 GB

    # 1. One process per device. Accelerate reads the rank and world size the launcher set, picks this
    #    process's device (xpu:<local rank>, cuda:<local rank>) and joins the process group (xccl on Intel GPUs,
    #    nccl on NVIDIA). With no accelerator, `cpu=True` makes the processes a gloo group on the CPU: without it
    #    every CPU process would think it is alone and make every image. A process that is done (or had nothing
    #    to do) waits in gather_object below while the others download, load and generate, for as long as they
    #    take: the group's timeout is a week, not NCCL's 10 minutes (gloo's 30), which would abort the job at its
    #    very end. A failure still ends the job at once: the launcher stops every process when one fails.
    distributed_state = PartialState(cpu=args.device == "cpu" or not torch.accelerator.is_available(),
                                     timeout=timedelta(days=7))
    if distributed_state.num_processes != int(os.environ.get("WORLD_SIZE", "1")):
        fail(f"the launcher started {os.environ['WORLD_SIZE']} processes but they formed no group, so each would "
             f"make every image: on Intel GPUs this torch ({torch.__version__}) lacks the xccl backend (install "
             "the XPU build of torch 2.8 or newer)")
    device = distributed_state.device
    if device.type == "cpu":  # in a CPU process group Accelerate says "cpu:0": moving the weights from "cpu"
        device = torch.device("cpu")  # to "cpu:0" would copy every one of them, twice the memory for nothing
    if not distributed_state.is_main_process:  # one copy of the libraries' warnings and progress bars is enough
        for library in (diffusers, transformers):
            library.utils.logging.set_verbosity_error()
            library.utils.logging.disable_progress_bar()

    # 2. The main process looks at what is already on disk and tells the others what is left to make, so that
    #    every process splits the same list, even one that starts late, after another has saved images.
    names = image_names(prompts)
    todo = [images_to_make(args, prompts, names) if distributed_state.is_main_process else None]
    todo = broadcast_object_list(todo)[0]

    # 3. Split the prompts. With 10 prompts and 4 processes, ranks 0 and 1 get 3 each, ranks 2 and 3 get 2:
    #    contiguous slices, the extra ones to the first ranks. No padding: nothing below is a tensor collective
    #    (gather_object takes lists of any length), so a process whose share is shorter, or empty when there
    #    are more processes than prompts, simply makes fewer images; it never makes a copy to be thrown away.
    made, generate_seconds = 0, 0.0
    with distributed_state.split_between_processes(todo) as my_share:
        if my_share:  # an empty share loads nothing and never calls the pipeline (an empty batch crashes it)
            # Every process loads the whole pipeline and moves it to its own device.
            try:
                pipeline = load_pipeline(args).to(device)
            except torch.OutOfMemoryError:
                fail(f"rank {distributed_state.process_index}: the pipeline does not fit on {device}: try --dtype "
                     "bfloat16, or shard it over several devices (model-parallelism-flux.py)", 1, every_process=True)
            args.output_dir.mkdir(parents=True, exist_ok=True)  # on another machine, it may not exist yet
            # Progress bars from several processes would overwrite each other: only the main process shows one.
            pipeline.set_progress_bar_config(disable=not distributed_state.is_main_process)
            options = pipeline_options(args, pipeline)
            generate_started = time.perf_counter()
            for start in range(0, len(my_share), args.batch_size):
                batch = my_share[start:start + args.batch_size]
                # The picture of prompt i depends only on SEED + i: a CPU generator per prompt makes the same
                # starting noise on any device and in any batch, so 1 or N processes give the same images.
                generators = [torch.Generator("cpu").manual_seed(args.seed + i) for i, _ in batch]
                t0 = time.perf_counter()
                try:
                    images = pipeline(prompt=[p for _, p in batch], generator=generators, height=args.height,
                                      width=args.width, **options).images
                except torch.OutOfMemoryError:
                    fail(f"rank {distributed_state.process_index} ran out of memory on {device}: try a smaller "
                         "--batch-size, --height/--width, or --dtype bfloat16", code=1, every_process=True)
                seconds = (time.perf_counter() - t0) / len(batch)
                for (i, prompt), image in zip(batch, images):
                    # 4. Save: each process writes its own images and manifest lines as soon as they are made.
                    write_atomically(args.output_dir / names[i], lambda tmp: image.save(tmp, format="PNG"))
                    append_line(args.output_dir / "manifest.jsonl", {
                        "index": i, "prompt": prompt, "file": names[i], "seed": args.seed + i,
                        "rank": distributed_state.process_index, "device": str(device), "seconds": round(seconds, 3),
                        "model": args.model, "width": image.width, "height": image.height,
                        "dtype": str(pipeline.dtype).removeprefix("torch."), **options})
                    made += 1
            generate_seconds = time.perf_counter() - generate_started

    # 5. Gather every process's numbers on the main process (this also waits for the last one) and report.
    stats = gather_object([{"rank": distributed_state.process_index, "device": str(device), "images": made,
                            "generate_seconds": generate_seconds, **peak_memory(device)}])
    if distributed_state.is_main_process:
        manifest = args.output_dir / "manifest.jsonl"
        write_manifest(manifest, read_manifest(manifest))  # every process appended its lines: sort them by index
        # Wall time since this process started, imports and loading included: what the user waited for.
        report(args, stats, len(todo), len(prompts), time.time() - psutil.Process().create_time())
    # Leave the process group before exiting: torn down by the interpreter at exit instead, gloo now and then
    # aborts the process ("terminate called without an active exception") after all the work is done.
    distributed_state.destroy_process_group()


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
                        help="weights' dtype; auto is bfloat16 on a GPU and float32 on the CPU (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="prompts per pipeline call in each process (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="make every image again, even those already in --output-dir")
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
    for name in ("num_inference_steps", "height", "width", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be a positive number, not {getattr(args, name)}")
    return args


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


def check_model(args):
    """Fail early, before any process loads weights: the model can be found and can make images of this size."""
    model = Path(args.model).expanduser()
    if model.exists() and not (model / "model_index.json").exists():
        fail(f"--model {args.model} is not a diffusers pipeline folder: it has no model_index.json")
    if not model.exists() and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", args.model):
        fail(f"--model {args.model}: no such folder, and not a Hub id (organisation/name)")
    diffusers.utils.logging.set_verbosity_error()  # a failed Hub look-up is said once, by us, not three times
    try:  # the configs only: a few kilobytes
        with warnings.catch_warnings(action="ignore"):  # the libraries' deprecation notices are not the user's
            components = DiffusionPipeline.load_config(args.model)
            vae = AutoencoderKL.load_config(args.model, subfolder="vae")
            patch = AutoencoderKL.load_config(args.model, subfolder="transformer").get("patch_size", 1) if (
                "transformer" in components) else 1
    except (OSError, ValueError) as e:
        fail(cannot_load(args.model, e))
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
            f"https://huggingface.co/{model} and run `hf auth login`; or pass --model PATH to a local copy")


def check_torch_can_use_the_gpus(device):
    """No silent CPU run: where this machine has GPUs that the installed torch cannot use, stop before anything
    is loaded, with the likely cause and the fix. Without this, PyPI's torch (no XPU support) on an Intel GPU, or
    its CUDA 13 build under an older NVIDIA driver, runs everything on the CPU, for hours, without a word."""
    if device == "cpu" or torch.accelerator.is_available():
        return
    gpus = gpus_on_the_pci_bus()
    keep = ("then `export UV_NO_SYNC=1` so that `uv run` keeps it (README: Set-up); or pass --device cpu to run on "
            "the CPU on purpose")
    if "NVIDIA" in gpus:  # first: a laptop may have an Intel GPU for the screen and an NVIDIA one to compute
        cuda = torch.version.cuda  # "13.2"; None in a torch built without CUDA
        # The oldest driver each CUDA major version runs on (NVIDIA's "minor version compatibility" table).
        driver = {"11": "450", "12": "525", "13": "580"}.get(str(cuda).split(".")[0])
        needs = f"NVIDIA driver {driver} or newer" if driver else f"an NVIDIA driver for CUDA {cuda}"
        cause = "it is not a CUDA build: install one" if cuda is None else (
            f"it is built for CUDA {cuda}, which needs {needs} (`nvidia-smi` shows yours): update the driver, or "
            "install a torch built for an older CUDA")
        fail(f"this machine has an NVIDIA GPU, but this torch ({torch.__version__}) cannot use it: {cause}: "
             f"`uv pip install --reinstall torch --index-url https://download.pytorch.org/whl/cu128`, {keep}")
    if "Intel" in gpus:
        fail(f"this machine has an Intel GPU, but this torch ({torch.__version__}) cannot use it: it is not the XPU "
             "build (PyPI's torch has no XPU support): `uv pip install --reinstall torch --index-url "
             f"https://download.pytorch.org/whl/xpu`, {keep}")


def gpus_on_the_pci_bus():
    """The makers of this machine's GPUs, read from the PCI devices Linux lists (what `lspci` reads): a display
    device (PCI class 0x03....) from NVIDIA (vendor 0x10de) or Intel (0x8086). Intel's bridges and other
    controllers are no GPU. Empty where there is no such folder (Windows, macOS): there, nothing is checked.
    Tests point SYSFS_PCI_DEVICES at a fake tree."""
    makers = {"0x10de": "NVIDIA", "0x8086": "Intel"}
    found = set()
    for pci_device in Path(os.environ.get("SYSFS_PCI_DEVICES", "/sys/bus/pci/devices")).glob("*"):
        try:
            vendor, pci_class = ((pci_device / name).read_text().strip().lower() for name in ("vendor", "class"))
        except OSError:  # not a device folder, or unreadable
            continue
        if vendor in makers and pci_class.startswith("0x03"):
            found.add(makers[vendor])
    return found


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
    if here > devices:  # two processes on one device: NCCL stops at the first collective ("Duplicate GPU")
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
    if here == 1 and devices > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        command = " ".join([launch, *map(shlex.quote, sys.argv[1:])])
        print(f"note: this machine has {devices} {kind} devices and one process uses only one of them: `{command}` "
              "uses them all", file=sys.stderr, flush=True)


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


def image_name(index, prompt, width):
    slug = re.sub(r"\W+", "-", prompt.lower()).strip("-_")[:60].rstrip("-_") or "prompt"
    return f"{index:0{width}d}-{slug}.png"


def write_atomically(path, write):
    """Write to a temporary name in the same folder, then rename: a file on disk is always whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def peak_memory(device):
    """Peak resident memory of this process and, on a GPU, peak memory allocated on its device (GiB)."""
    if sys.platform == "win32":
        peak_rss = psutil.Process().memory_info().peak_wset
    else:
        import resource  # Unix only; ru_maxrss is in KiB on Linux, in bytes on macOS

        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    stats = {"peak_rss_gib": round(peak_rss / 2**30, 2)}
    if device.type != "cpu":
        stats["peak_device_gib"] = round(torch.accelerator.max_memory_allocated(device) / 2**30, 2)
    return stats


def load_pipeline(args):
    on_gpu = args.device != "cpu" and torch.accelerator.is_available()
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.bfloat16 if on_gpu else torch.float32
    try:
        return DiffusionPipeline.from_pretrained(args.model, dtype=dtype)
    except (OSError, ValueError) as e:  # e.g. the configs came from the cache but the weights cannot be fetched
        fail(cannot_load(args.model, e))


def pipeline_options(args, pipeline):
    """Steps and guidance as asked, or the pipeline's own defaults (28 and 7.0 for SD3, 28 and 3.5 for Flux)."""
    defaults = inspect.signature(pipeline.__call__).parameters
    return {name: value if value is not None else defaults[name].default for name, value in (
        ("num_inference_steps", args.num_inference_steps), ("guidance_scale", args.guidance_scale))}


def image_names(prompts):
    """`007-a-red-fox-in-fresh-snow.png`: the prompt's index first, then a file-system-safe slug of its text."""
    width = max(3, len(str(len(prompts) - 1)))
    return [image_name(i, p, width) for i, p in enumerate(prompts)]


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
                 "guidance_scale": args.guidance_scale, "width": args.width, "height": args.height}
        differ = [key for key, value in asked.items() if value is not None and key in r and r[key] != value]
        if differ:
            fail(f"{args.output_dir / r['file']} was made with another {', '.join(differ)}: add --overwrite to "
                 "make every image again, or choose another --output-dir")
    for i in done - records.keys():  # "rebuilt": what this command would have written, not a record of the run
        records[i] = {"index": i, "prompt": prompts[i], "file": names[i], "seed": args.seed + i, "rank": None,
                      "rebuilt": True}
    write_manifest(manifest, records)
    if done:
        print(f"{len(done)} of {len(prompts)} images are already in {args.output_dir}: making only the missing "
              "ones (--overwrite makes them all again)", flush=True)
    return [(i, prompts[i]) for i in range(len(prompts)) if i not in done]


def append_line(path, record):
    """Append one manifest line in a single write: lines from several processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def report(args, stats, made, total, wall_seconds):
    generate_seconds = max(s["generate_seconds"] for s in stats)
    print(f"\nmade {made} images ({total - made} already there) with {len(stats)} process(es) "
          f"in {wall_seconds:.1f} s: {made / wall_seconds:.2f} images/s overall, "
          f"{made / generate_seconds if generate_seconds else 0:.2f} images/s while generating")
    for s in stats:
        memory = f"peak RSS {s['peak_rss_gib']:.2f} GiB" + (
            f", peak device memory {s['peak_device_gib']:.2f} GiB" if "peak_device_gib" in s else "")
        print(f"  rank {s['rank']} on {s['device']}: {s['images']} images in {s['generate_seconds']:.1f} s, {memory}")
    print(f"images and manifest.jsonl in {args.output_dir}/")
    write_atomically(args.output_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(
        {"processes": len(stats), "images": made, "wall_seconds": wall_seconds,
         "generate_seconds": generate_seconds, "ranks": stats}, indent=2)))


if __name__ == "__main__":
    # A launcher stops the other processes with SIGTERM when one fails: exit through Python, so that
    # nothing is left half-written, instead of dying on the spot.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted: the images already made are kept; run the same command again to make the rest", 130)
