"""A machine with GPUs, as torch answers about them, for tests on a machine that has none.

The libraries ask at several depths: the scripts and Accelerate ask `torch.accelerator` and `torch.cuda` (or
`torch.xpu`) in Python; `torch.distributed` asks torch's C++ side (`torch._C._get_accelerator()`, which its
barrier uses to pick a device, and `torch._C._accelerator_*`, behind `torch.accelerator`); diffusers asks
`torch._C._get_accelerator()` for the device type of its context-parallel mesh. A fake that patched only the Python
names would miss what a real GPU machine shows, so `simulate` answers at every one of those depths:

- the accelerator: "cuda" or "xpu", at run time and at compile time;
- how many GPUs this process sees: N physical GPUs, less those a mask hides (CUDA_VISIBLE_DEVICES or
  ZE_AFFINITY_MASK, as the driver reads it: a list of indices, in its order);
- the current device, and setting it (torch.cuda.set_device, torch.accelerator.set_device_index);
- each GPU's properties: a name, 24 GiB, FP64 or not (Intel's Arc A-series has none), and a UUID that follows
  the physical GPU through any mask (two processes shown the same GPU see the same UUID);
- free memory, and bfloat16 (the GPUs of today have it);
- their process-group backend (nccl, xccl) available, as in a torch built for them.

They cannot compute: moving a tensor to one fails as on a machine whose driver is gone. The tests that need a GPU
that computes are marked `gpu`. Used in subprocesses by tests/simulate/sitecustomize.py (FAKE_GPUS=N, and
FAKE_ACCELERATOR, FAKE_NO_FP64), and in the test's own process by `simulate(..., patch=...)` with the test's
monkeypatch (tests/conftest.py: simulated_gpus).
"""

import os
from types import SimpleNamespace

import torch

GiB = 2**30
MASKS = {"cuda": "CUDA_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}
NAMES = {"cuda": "NVIDIA H100 80GB HBM3 (simulated)", "xpu": "Intel(R) Arc(TM) A770 Graphics (simulated)"}


def visible_gpus(physical, kind, environ=os.environ):
    """The physical GPUs this process sees, in the order the mask gives them: all of them without a mask."""
    mask = environ.get(MASKS[kind])
    if mask is None or (kind == "xpu" and not mask.strip()):  # an empty ZE_AFFINITY_MASK hides nothing
        return list(range(physical))
    seen = []
    for entry in mask.split(","):
        entry = entry.strip().split(".")[0]  # ZE_AFFINITY_MASK=0.1: the first GPU's second tile: that GPU
        if not entry.isdigit() or int(entry) >= physical:
            if kind == "cuda":
                break  # CUDA stops at the first entry that names no GPU; Level Zero skips it
            continue
        if int(entry) not in seen:
            seen.append(int(entry))
    return seen


def simulate(physical, kind="cuda", fp64=True, patch=setattr, environ=os.environ):
    """Make torch, in this process, answer as on a machine with `physical` GPUs of `kind`. `patch(owner, name,
    value)` is the builtin setattr (a subprocess, for good) or a test's monkeypatch (undone after the test)."""
    visible = visible_gpus(physical, kind, environ)
    current = [0]

    def index(device=None):
        if device is None:
            return current[0]
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return current[0] if device.index is None else device.index

    def properties(device=None):
        i = index(device)
        if not 0 <= i < len(visible):
            raise RuntimeError(f"{kind} error: invalid device ordinal {i} (simulated: {len(visible)} visible)")
        gpu = visible[i]  # the physical GPU: its UUID is the same whatever index a mask gives it
        return SimpleNamespace(name=NAMES[kind], total_memory=24 * GiB, has_fp64=fp64, major=9, minor=0,
                               multi_processor_count=132, uuid=f"GPU-5eed0000-0000-4000-8000-{gpu:012d}")

    def set_device(device):
        current[0] = index(device)

    accelerator = torch.device(kind)
    module = getattr(torch, kind)
    backend = {"cuda": "nccl", "xpu": "xccl"}[kind]
    available = torch.distributed.is_backend_available
    for owner, name, value in [
        # torch's C++ side: the accelerator at run time (torch.distributed's barrier, diffusers' mesh) and at
        # compile time (torch.accelerator.current_accelerator), the current device and the device count.
        (torch._C, "_get_accelerator", lambda: accelerator),
        (torch._C, "_accelerator_getAccelerator", lambda: accelerator),
        (torch._C, "_accelerator_getDeviceIndex", lambda: current[0]),
        (torch._C, "_accelerator_setDeviceIndex", set_device),
        (torch._C, "_accelerator_getMemoryInfo", lambda i=None: (20 * GiB, 24 * GiB)),
        (torch._C, f"_{kind}_getDeviceCount", lambda: len(visible)),
        (torch._C, f"_{kind}_getDevice", lambda: current[0]),
        (torch._C, f"_{kind}_setDevice", set_device),
        # torch.cuda / torch.xpu in Python: what the scripts, Accelerate and torch.accelerator ask.
        (module, "is_available", lambda: bool(visible)),
        (module, "device_count", lambda: len(visible)),
        (module, "current_device", lambda: current[0]),
        (module, "set_device", set_device),
        (module, "get_device_properties", properties),
        (module, "get_device_name", lambda device=None: properties(device).name),
        (module, "is_bf16_supported", lambda including_emulation=True: True),
        (module, "mem_get_info", lambda device=None: (20 * GiB, 24 * GiB)),
        # The GPUs' process-group backend, as a torch built for them has it (PyPI's has no xccl, torch's XPU build
        # no nccl): what the launch check asks before any group forms. A group with it cannot form here.
        (torch.distributed, "is_backend_available", lambda name: name == backend or available(name)),
    ]:
        # A function of its own for each name: torch.compile's rules refuse one function under two torch names.
        patch(owner, name, (lambda answer: lambda *args, **kwargs: answer(*args, **kwargs))(value))
    return visible


def record(folder):
    """Write what torch answers in this process (a launched process's rank, the accelerator, the devices it sees,
    the mask): the proof, for the tests of the tests, that a run was made on the simulated machine."""
    import json

    import sys

    seen = {"argv0": sys.argv[0], "rank": os.environ.get("RANK"), "accelerator": torch._C._get_accelerator().type,
            "devices": torch.accelerator.device_count(), "available": torch.accelerator.is_available(),
            "mask": {name: os.environ[name] for name in MASKS.values() if name in os.environ}}
    with open(os.path.join(folder, f"seen-{os.getpid()}.json"), "w") as file:
        json.dump(seen, file)
