"""Real GPU machines: no silent CPU run, launch mistakes caught up front, no time limit on a legitimate wait.

Most of it runs anywhere, by simulation: a fake /sys/bus/pci/devices tree (SYSFS_PCI_DEVICES), and torch's
answers about accelerators and process-group backends monkeypatched. The tests marked `accelerator` run the
real commands on the GPUs of the machine, and are skipped (reported as skipped) where there is none.
"""

import argparse
import json
import os
import re
import shlex
import socket
import sys
from datetime import timedelta

import numpy as np
import pytest
import torch
from accelerate import PartialState
from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

from tests.conftest import (BIN, DATA_PARALLEL, ROOT, SIMULATE, accelerator, assert_clear_error, free_port,
                            launched_as, load_script, pixels, python, read_manifest, run, run_main, simulated_gpus,
                            torchrun)

SCRIPTS = [DATA_PARALLEL, ROOT / "model-parallelism-flux.py"]  # both have the "no silent CPU" check
# ...and so has the context parallel script, whose checks are the data parallel script's own, word for word
# (tests/test_context_parallelism.py): it is run where that is cheap, in this process.
EVERY_SCRIPT = [*SCRIPTS, ROOT / "context-parallelism-flux.py"]
DISTRIBUTED = [DATA_PARALLEL, ROOT / "context-parallelism-flux.py", ROOT / "cfg-parallelism-sd3.py"]  # form a group
FAST = ["--num-inference-steps", "2", "--height", "64", "--width", "64"]
NVIDIA_GPU, INTEL_GPU = ("0x10de", "0x030200"), ("0x8086", "0x030000")  # a 3D controller, a VGA controller
INTEL_BRIDGES = [("0x8086", "0x060000"), ("0x8086", "0x060400"), ("0x8086", "0x0c0330")]  # host, PCI, USB
OTHERS = [("0x1af4", "0x020000"), ("0x1a03", "0x030000")]  # a virtio network card; a server's ASPEED VGA


def fake_sysfs(tmp_path, *devices):
    """A /sys/bus/pci/devices tree: one folder per device, with its `vendor` and `class` files; beside it a /dev
    with the device nodes of NVIDIA and Intel GPUs (fake_dev), as on a machine whose drivers are loaded."""
    fake_dev(tmp_path, "nvidia0", "nvidiactl", "dri/card0", "dri/renderD128")
    root = tmp_path / "pci-devices"
    root.mkdir()
    for slot, (vendor, pci_class) in enumerate(devices):
        device = root / f"0000:00:{slot:02x}.0"
        device.mkdir()
        (device / "vendor").write_text(vendor + "\n")
        (device / "class").write_text(pci_class + "\n")
    return root


def fake_dev(tmp_path, *nodes):
    """A /dev folder with these device nodes (empty files: only their names are read)."""
    dev = tmp_path / "dev"
    dev.mkdir(exist_ok=True)
    for node in nodes:
        (dev / node).parent.mkdir(parents=True, exist_ok=True)
        (dev / node).touch()
    return dev


@pytest.fixture(autouse=True)
def nothing_hidden(monkeypatch, tmp_path):
    """Every test starts on a machine whose GPUs nobody hid: no masks, and the fake /dev of fake_sysfs."""
    for variable in ("CUDA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("DEVICE_NODES", str(tmp_path / "dev"))


@pytest.fixture(scope="module", params=SCRIPTS, ids=lambda path: path.name)
def script(request):
    """The script, imported as a module, for the tests of its helpers."""
    return load_script(request.param)


def gpus_found(script, monkeypatch, root):
    monkeypatch.setenv("SYSFS_PCI_DEVICES", str(root))
    return script.gpus_on_the_pci_bus()


# --- reading the PCI devices ---


def test_an_nvidia_display_device_is_an_nvidia_gpu(script, monkeypatch, tmp_path):
    assert gpus_found(script, monkeypatch, fake_sysfs(tmp_path, *INTEL_BRIDGES, NVIDIA_GPU, *OTHERS)) == {"NVIDIA": 1}


def test_an_intel_display_device_is_an_intel_gpu(script, monkeypatch, tmp_path):
    assert gpus_found(script, monkeypatch, fake_sysfs(tmp_path, *INTEL_BRIDGES, INTEL_GPU, *OTHERS)) == {"Intel": 1}


def test_each_gpu_is_counted(script, monkeypatch, tmp_path):
    assert gpus_found(script, monkeypatch, fake_sysfs(tmp_path, NVIDIA_GPU, INTEL_GPU, NVIDIA_GPU)) == {
        "NVIDIA": 2, "Intel": 1}


def test_intel_bridges_and_controllers_alone_are_no_gpu(script, monkeypatch, tmp_path):
    assert gpus_found(script, monkeypatch, fake_sysfs(tmp_path, *INTEL_BRIDGES, *OTHERS)) == {}


def test_no_pci_folder_finds_no_gpu(script, monkeypatch, tmp_path):
    assert gpus_found(script, monkeypatch, tmp_path / "no-sysfs-here") == {}


# --- the messages, by simulation: this torch sees no GPU on a machine that has one ---


def refusal(script, monkeypatch, capsys, tmp_path, devices, device="auto", torch_sees_a_gpu=False):
    """What the check says (stderr) and its exit code (None: it let the run go on)."""
    monkeypatch.setenv("SYSFS_PCI_DEVICES", str(fake_sysfs(tmp_path, *devices)))
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: torch_sees_a_gpu)
    try:
        script.check_torch_can_use_the_gpus(device)
        code = None
    except SystemExit as e:
        code = e.code
    return capsys.readouterr().err, code


def assert_one_error_line(err, code, *expected):
    assert code not in (None, 0)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]


def test_an_nvidia_gpu_under_a_driver_too_old_for_this_cuda_build_names_the_driver_and_an_older_build(
        script, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    err, code = refusal(script, monkeypatch, capsys, tmp_path, [*INTEL_BRIDGES, NVIDIA_GPU])
    assert_one_error_line(err, code, "NVIDIA GPU", torch.__version__, "CUDA 13.2", "driver 580 or newer",
                          "uv pip install --reinstall torch --index-url https://download.pytorch.org/whl/cu128",
                          "UV_NO_SYNC=1", "--device cpu")


def test_an_nvidia_gpu_with_a_torch_built_without_cuda_says_to_install_a_cuda_build(
        script, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", None)
    err, code = refusal(script, monkeypatch, capsys, tmp_path, [NVIDIA_GPU])
    assert_one_error_line(err, code, "NVIDIA GPU", torch.__version__, "not a CUDA build",
                          "--index-url https://download.pytorch.org/whl/cu128")


def test_an_intel_gpu_with_pypis_torch_gives_the_xpu_wheel_command(script, monkeypatch, capsys, tmp_path):
    err, code = refusal(script, monkeypatch, capsys, tmp_path, [*INTEL_BRIDGES, INTEL_GPU])
    assert_one_error_line(err, code, "Intel GPU", torch.__version__, "not the XPU build",
                          "uv pip install --reinstall torch --index-url https://download.pytorch.org/whl/xpu",
                          "UV_NO_SYNC=1", "--device cpu")


def test_an_intel_screen_gpu_beside_an_nvidia_gpu_gets_the_nvidia_message(script, monkeypatch, capsys, tmp_path):
    err, code = refusal(script, monkeypatch, capsys, tmp_path, [INTEL_GPU, NVIDIA_GPU])
    assert_one_error_line(err, code, "NVIDIA GPU")


@pytest.mark.parametrize("devices", [[*INTEL_BRIDGES, *OTHERS], []], ids=["intel-bridges-only", "no-devices"])
def test_a_machine_without_gpus_runs_on_the_cpu_as_before(script, monkeypatch, capsys, tmp_path, devices):
    assert refusal(script, monkeypatch, capsys, tmp_path, devices) == ("", None)


def test_device_cpu_runs_on_the_cpu_on_purpose_beside_a_gpu(script, monkeypatch, capsys, tmp_path):
    assert refusal(script, monkeypatch, capsys, tmp_path, [NVIDIA_GPU], device="cpu") == ("", None)


def test_a_gpu_that_torch_can_use_is_no_problem(script, monkeypatch, capsys, tmp_path):
    assert refusal(script, monkeypatch, capsys, tmp_path, [INTEL_GPU], torch_sees_a_gpu=True) == ("", None)


# --- GPUs hidden on purpose (CUDA_VISIBLE_DEVICES, ZE_AFFINITY_MASK), or not in this container: run on the CPU ---


@pytest.mark.parametrize("gpu, variable, mask", [
    (NVIDIA_GPU, "CUDA_VISIBLE_DEVICES", ""), (NVIDIA_GPU, "CUDA_VISIBLE_DEVICES", "-1"),
    (NVIDIA_GPU, "CUDA_VISIBLE_DEVICES", "1"),  # the machine has one GPU: number 1 is none
    (INTEL_GPU, "ZE_AFFINITY_MASK", "3"), (INTEL_GPU, "ZE_AFFINITY_MASK", "1.0,2"),
], ids=["cuda-empty", "cuda-minus-1", "cuda-no-such-gpu", "ze-no-such-gpu", "ze-no-such-gpus"])
def test_gpus_the_user_hid_are_no_reason_to_refuse(script, monkeypatch, capsys, tmp_path, gpu, variable, mask):
    monkeypatch.setenv(variable, mask)
    err, code = refusal(script, monkeypatch, capsys, tmp_path, [gpu])
    assert code is None
    assert err.splitlines() == [f"note: {variable}={mask} hides every {'NVIDIA' if gpu == NVIDIA_GPU else 'Intel'} "
                                "GPU: running on the CPU"]


@pytest.mark.parametrize("gpu, nodes", [(NVIDIA_GPU, "nvidia0"), (INTEL_GPU, "dri/renderD128")],
                         ids=["nvidia", "intel"])
def test_a_container_given_no_gpu_runs_on_the_cpu_on_a_gpu_server(script, monkeypatch, capsys, tmp_path, gpu, nodes):
    """A container sees its host's PCI bus, but has no device node of a GPU it was not given."""
    monkeypatch.setenv("SYSFS_PCI_DEVICES", str(fake_sysfs(tmp_path, gpu)))
    for node in (tmp_path / "dev").rglob("*"):
        if node.is_file():
            node.unlink()
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    script.check_torch_can_use_the_gpus("auto")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: ") and lines[0].endswith(": running on the CPU")
    assert str(tmp_path / "dev" / ("nvidia[0-9]*" if gpu == NVIDIA_GPU else "dri/renderD*")) in lines[0]


@pytest.mark.parametrize("gpu, variable, mask", [
    (NVIDIA_GPU, "CUDA_VISIBLE_DEVICES", "0"), (NVIDIA_GPU, "CUDA_VISIBLE_DEVICES", "GPU-8f6b"),
    (INTEL_GPU, "ZE_AFFINITY_MASK", "0"), (INTEL_GPU, "ZE_AFFINITY_MASK", ""), (INTEL_GPU, "ZE_AFFINITY_MASK", "5,0.1"),
], ids=["cuda-0", "cuda-uuid", "ze-0", "ze-empty", "ze-one-real"])
def test_a_mask_that_leaves_a_gpu_visible_still_gets_the_fix(script, monkeypatch, capsys, tmp_path, gpu, variable,
                                                              mask):
    monkeypatch.setenv(variable, mask)
    err, code = refusal(script, monkeypatch, capsys, tmp_path, [gpu])
    assert_one_error_line(err, code, "but this torch", "cannot use it")


def test_a_hidden_nvidia_gpu_beside_an_intel_one_gets_the_intel_message(script, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    err, code = refusal(script, monkeypatch, capsys, tmp_path, [INTEL_GPU, NVIDIA_GPU])
    assert_one_error_line(err, code, "Intel GPU", "not the XPU build")


@pytest.mark.skipif(torch.accelerator.is_available(), reason="needs a machine where torch sees no GPU")
@pytest.mark.parametrize("script_path", SCRIPTS, ids=lambda path: path.name)
def test_a_cpu_only_container_on_a_gpu_server_makes_the_images(script_path, request, tmp_path):
    args = model_and_output(script_path, request, tmp_path)
    pci = fake_sysfs(tmp_path, *INTEL_BRIDGES, NVIDIA_GPU, NVIDIA_GPU)
    result = run_main(script_path, *args, *FAST, SYSFS_PCI_DEVICES=str(pci), DEVICE_NODES=str(tmp_path / "no-dev"),
                      CUDA_VISIBLE_DEVICES=None, ZE_AFFINITY_MASK=None, check=True)
    assert_the_images_are_made(script_path, args)
    assert [line for line in result.stderr.splitlines() if line.startswith(("note:", "error:"))] == [
        f"note: this machine has NVIDIA GPUs but no {tmp_path / 'no-dev' / 'nvidia[0-9]*'} device node to reach them "
        "(a container given none, or no driver loaded): running on the CPU"]


# --- the real command: it stops before loading anything, or runs as before ---


def model_and_output(script_path, request, tmp_path):
    if "flux" in script_path.name:
        return ["--model", request.getfixturevalue("tiny_flux"), "--output", tmp_path / "out.png"]
    return ["--model", request.getfixturevalue("tiny_sd3"), "--output-dir", tmp_path / "out"]


def assert_the_images_are_made(script_path, args):
    """What the run was for, on disk: each image of the manifest (which the summary counts), or the one image."""
    if script_path == DATA_PARALLEL:
        out = args[-1]
        manifest = read_manifest(out)
        assert manifest and all(pixels(out / r["file_name"]).shape == (64, 64, 3) for r in manifest)
        assert json.loads((out / "summary.json").read_text())["images"] == len(manifest)
    else:
        assert pixels(args[-1]).shape == (64, 64, 3)


def main_on(pci_devices, script_path, *args, **env):
    """Run a script's main() in this process (tests/conftest.py: run_main) on a machine with these PCI devices,
    their drivers loaded (the fake /dev beside them), and no GPU hidden: for what ends before anything loads, and
    for a plain one-process run whose images and own lines the test checks."""
    return run_main(script_path, *args, SYSFS_PCI_DEVICES=str(pci_devices),
                    DEVICE_NODES=str(pci_devices.parent / "dev"), CUDA_VISIBLE_DEVICES=None, ZE_AFFINITY_MASK=None,
                    **env)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="needs a machine where torch sees no GPU")
@pytest.mark.parametrize("script_path", EVERY_SCRIPT, ids=lambda path: path.name)
@pytest.mark.parametrize("gpu, words", [(NVIDIA_GPU, ["NVIDIA GPU", "driver"]), (INTEL_GPU, ["Intel GPU", "XPU"])],
                         ids=["nvidia", "intel"])
def test_a_gpu_that_torch_cannot_use_stops_the_script_before_it_loads_anything(
        script_path, gpu, words, request, tmp_path):
    args = model_and_output(script_path, request, tmp_path)
    result = main_on(fake_sysfs(tmp_path, *INTEL_BRIDGES, gpu), script_path, *args, *FAST)
    assert_clear_error(result, *words, torch.__version__)
    assert not args[-1].exists()  # no output folder, no image: it stopped before loading the pipeline


@pytest.mark.skipif(torch.accelerator.is_available(), reason="needs a machine where torch sees no GPU")
def test_under_a_launcher_the_gpu_that_torch_cannot_use_is_said_once(tiny_sd3, tmp_path):
    """The two processes a launcher starts, each run here as that process (its launcher's variables): both stop,
    before any process group (so neither waits for the other, and the launcher ends the job), and the first alone
    says why. (A real torchrun, both processes failing alike: tests/test_data_parallelism.py.)"""
    machine, said = fake_sysfs(tmp_path, NVIDIA_GPU), []
    for rank in (0, 1):
        result = main_on(machine, DATA_PARALLEL, "--model", tiny_sd3, *FAST, "--output-dir", tmp_path / "out",
                         **launched_as(rank))
        assert result.returncode not in (None, 0)
        said.append(result.stderr)
    assert said[0].count("error: this machine has an NVIDIA GPU") == 1 and said[1] == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.accelerator.is_available(), reason="needs a machine where torch sees no GPU")
def test_the_readme_shows_what_the_script_says_without_the_xpu_build(tmp_path):
    readme = (ROOT / "docs" / "setup.md").read_text(encoding="utf-8").split("## Intel GPUs", 1)[1].split("\n## ", 1)[0]
    shown = re.search(r"```text\n\s*(error: .*)\n", readme).group(1)
    result = main_on(fake_sysfs(tmp_path, *INTEL_BRIDGES, INTEL_GPU), DATA_PARALLEL)
    said = result.stderr.strip()
    # The same line, but for torch's version: the page shows the one PyPI's torch 2.15 gives.
    assert re.sub(r"this torch \([^)]*\)", "", said) == re.sub(r"this torch \([^)]*\)", "", shown)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="needs a machine where torch sees no GPU")
@pytest.mark.parametrize("script_path", SCRIPTS, ids=lambda path: path.name)
def test_device_cpu_makes_the_images_on_a_machine_whose_gpu_torch_cannot_use(script_path, request, tmp_path):
    args = model_and_output(script_path, request, tmp_path)
    main_on(fake_sysfs(tmp_path, NVIDIA_GPU), script_path, *args, *FAST, "--device", "cpu", check=True)
    assert_the_images_are_made(script_path, args)


@pytest.mark.parametrize("script_path", SCRIPTS, ids=lambda path: path.name)
def test_intel_bridges_alone_let_the_script_run_as_before(script_path, request, tmp_path):
    args = model_and_output(script_path, request, tmp_path)
    main_on(fake_sysfs(tmp_path, *INTEL_BRIDGES, *OTHERS), script_path, *args, *FAST, check=True)
    assert_the_images_are_made(script_path, args)


# --- launch mistakes, by simulation: torch's view of the accelerators and the launcher's environment ---


@pytest.fixture(scope="module")
def data_parallel():
    return load_script(DATA_PARALLEL)


def launch(data_parallel, monkeypatch, capsys, kind="cuda", devices=1, processes=1, machines=1, local_rank=0,
           backends=("nccl", "xccl", "gloo"), device="auto", **masks):
    """Run the script's launch check on `devices` GPUs with `processes` per machine, and the GPU masks given
    (CUDA_VISIBLE_DEVICES=..., none by default), and for a lone process the note join_the_group gives it once the
    group has formed: (stderr, exit code or None)."""
    for variable in ("CUDA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK"):
        monkeypatch.delenv(variable, raising=False)
    for variable, mask in masks.items():
        monkeypatch.setenv(variable, mask)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: devices)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device(kind))
    monkeypatch.setattr(torch.distributed, "is_backend_available", lambda backend: backend in backends)
    monkeypatch.setattr(sys, "argv", ["data-parallelism-accelerate.py", "--prompt", "a red fox"])
    if processes * machines > 1:  # what torchrun (also under accelerate launch) sets in each process
        monkeypatch.setenv("WORLD_SIZE", str(processes * machines))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    else:  # plain python
        for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(name, raising=False)
    try:
        data_parallel.check_launch(argparse.Namespace(device=device))
        if processes * machines == 1:
            data_parallel.idle_devices_note(argparse.Namespace(device=device))
        code = None
    except SystemExit as e:
        code = e.code
    return capsys.readouterr().err, code


def test_more_processes_than_gpus_on_a_machine_is_refused(data_parallel, monkeypatch, capsys):
    err, code = launch(data_parallel, monkeypatch, capsys, devices=1, processes=2)
    assert_one_error_line(err, code, "2 processes on this machine", "1 cuda device", "one process per device",
                          "uv run data-parallelism-accelerate.py", "--nproc-per-node 1")


def test_more_processes_than_gpus_names_the_launch_that_fits(data_parallel, monkeypatch, capsys):
    err, code = launch(data_parallel, monkeypatch, capsys, kind="xpu", devices=2, processes=4, machines=2)
    assert_one_error_line(err, code, "4 processes on this machine", "2 xpu device",
                          "uv run accelerate launch --multi_gpu --num_processes 2 data-parallelism-accelerate.py")


@pytest.mark.parametrize("kind, variable", [("cuda", "CUDA_VISIBLE_DEVICES"), ("xpu", "ZE_AFFINITY_MASK")])
@pytest.mark.parametrize("local_rank", [0, 1, 3])
def test_each_process_with_a_gpu_of_its_own_is_accepted(data_parallel, monkeypatch, capsys, kind, variable,
                                                        local_rank):
    """4 processes, each given its own GPU by the launcher (a mask per process): each sees 1 device."""
    assert launch(data_parallel, monkeypatch, capsys, kind=kind, devices=1, processes=4, local_rank=local_rank,
                  **{variable: str(local_rank)}) == ("", None)


def test_a_launch_mistake_is_said_by_the_first_process_of_each_machine_only(data_parallel, monkeypatch, capsys):
    err, code = launch(data_parallel, monkeypatch, capsys, devices=1, processes=2, local_rank=1)
    assert code not in (None, 0) and err == ""


# --- one process per GPU, whatever the masks: each process says which GPU it got, before the GPUs' backend starts ---


@pytest.mark.parametrize("script_path", DISTRIBUTED, ids=lambda path: path.name)
def test_two_processes_shown_the_same_gpu_are_refused_in_one_line(script_path, tiny, tmp_path):
    """CUDA_VISIBLE_DEVICES=0 for the 2 processes of a launch on a machine with one GPU (a Slurm job given one GPU,
    a mask set to hide a screen's GPU): both would run on device 0, and NCCL would stop at its first collective
    ("Duplicate GPU detected"), or they would share its memory. Simulated (tests/simulate/fake_gpus.py): the launch
    check lets a mask through, so each process writes the GPU it got into the launcher's store, and the script
    stops, in one line, before any GPU backend or weight is loaded. The launcher's own report may follow."""
    model = tiny["sd3" if "sd3" in script_path.name or "data" in script_path.name else "flux"]
    out = ["--output-dir", tmp_path / "out"] if script_path == DATA_PARALLEL else ["--output", tmp_path / "out.png"]
    result = run(torchrun(2, script_path, "--model", model, *FAST, *out), check=False, timeout=120, env={
        "PYTHONPATH": str(SIMULATE), "FAKE_GPUS": "1", "CUDA_VISIBLE_DEVICES": "0"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: ranks 0 and 1 would both run on cuda:0 of {socket.gethostname()} (GPU-5eed0000-0000-"
                      "4000-8000-000000000000): CUDA_VISIBLE_DEVICES=0 shows these processes the same GPUs; start "
                      "one process per GPU (torchrun: --nproc-per-node, accelerate launch: --num_processes), or give "
                      "each process a GPU of its own"], result.stderr
    assert f'File "{script_path}"' not in result.stderr  # no traceback from the script (torchrun's own may follow)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("rank0, rank1, refused", [
    (("1", 0), ("0", 0), False),  # a mask each: both see their GPU as device 0, and they are 2 GPUs
    (("0", 0), ("0", 0), True),  # the same mask for both: one GPU
    ((None, 0), (None, 1), False),  # no mask: local ranks 0 and 1 on devices 0 and 1
    ((None, 1), ("1", 0), True),  # device 1 unmasked is the same GPU as device 0 under the mask "1"
], ids=["a-gpu-each", "the-same-mask", "no-mask", "the-same-gpu-under-two-names"])
def test_the_gpu_a_process_got_is_told_apart_by_its_uuid_through_any_mask(rank0, rank1, refused, data_parallel,
                                                                           monkeypatch, capsys):
    """The check as each of 2 ranks in turn, in this process, through one store (the launcher's; here a HashStore),
    on a machine with 2 simulated GPUs: each rank has its own mask (CUDA_VISIBLE_DEVICES, or none) and device."""
    store = torch.distributed.HashStore()
    for rank, ((mask, index), world_size) in enumerate([(rank0, 1), (rank1, 2)]):  # rank 0 reads only its own
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        if mask is not None:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
        simulated_gpus(monkeypatch, 2, "cuda")
        try:
            data_parallel.check_one_process_per_device(store, rank, world_size, torch.device("cuda", index))
            said = None
        except SystemExit:
            said = capsys.readouterr().err
    assert (said is not None) == refused
    if refused:
        assert_one_error_line(said, 2, "ranks 0 and 1 would both run on", "GPU-5eed0000-0000-4000-8000-00000000000",
                              "give each process a GPU of its own")


def test_the_barrier_names_the_device_this_process_uses_and_none_on_the_cpu(monkeypatch):
    """Accelerate's wait_for_everyone passes the local rank as the barrier's device (cuda:1 for local rank 1): not
    the device of a process whose mask shows it one GPU, as device 0, and a GPU even for CPU processes wherever torch
    can use one (torch's barrier takes torch._C._get_accelerator()'s type). Observed in this process as local rank 1
    of 2, with a mask of its own, on 2 simulated GPUs: the group form_the_group forms (the launcher's store and
    init_process_group stood in for, Accelerate's PartialState as it is), the device Accelerate picks for it, and the
    barrier the scripts' own wait_for_everyone makes on it; then on the CPU."""
    script = load_script(ROOT / "context-parallelism-flux.py")
    for name, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                            CUDA_VISIBLE_DEVICES="1").items():
        monkeypatch.setenv(name, value)
    simulated_gpus(monkeypatch, 2, "cuda")
    store = torch.distributed.HashStore()  # what rank 0, on the other GPU, wrote there
    store.set("gpu-of-rank-0", json.dumps({"gpu": "GPU-5eed0000-0000-4000-8000-000000000000", "device": "cuda:0",
                                           "host": socket.gethostname(), "mask": "CUDA_VISIBLE_DEVICES=0"}))
    formed, asked = [], []
    monkeypatch.setattr(torch.distributed, "rendezvous", lambda url, **kwargs: iter([(store, 1, 2)]))

    def init_process_group(backend, **kwargs):
        formed.append(backend)
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)

    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    monkeypatch.setattr(torch.distributed, "barrier", lambda **kwargs: asked.append(kwargs.get("device_ids")))
    try:
        state, device = script.form_the_group(argparse.Namespace(device="auto"))
        script.wait_for_everyone(device)
        assert (formed, state.num_processes, device) == (["cpu:gloo,cuda:nccl"], 2, torch.device("cuda", 0))
    finally:
        PartialState._reset_state()
    script.wait_for_everyone(torch.device("cpu"))
    assert asked == [[0], None]


def test_an_xpu_torch_without_xccl_is_refused_with_the_xpu_wheel_command(data_parallel, monkeypatch, capsys):
    err, code = launch(data_parallel, monkeypatch, capsys, kind="xpu", devices=2, processes=2, backends=("gloo",))
    assert_one_error_line(err, code, torch.__version__, "xccl", "--index-url https://download.pytorch.org/whl/xpu")


def test_a_cuda_torch_without_nccl_is_refused(data_parallel, monkeypatch, capsys):
    err, code = launch(data_parallel, monkeypatch, capsys, kind="cuda", devices=2, processes=2, backends=("gloo",))
    assert_one_error_line(err, code, torch.__version__, "nccl", "Linux")


def test_one_process_beside_several_gpus_gets_a_note_with_the_command_that_uses_them_all(
        data_parallel, monkeypatch, capsys):
    err, code = launch(data_parallel, monkeypatch, capsys, devices=4, processes=1)
    assert code is None  # the run goes on
    assert err.splitlines() == ["note: this machine has 4 cuda devices and one process uses only one of them: "
                                "`uv run accelerate launch --multi_gpu --num_processes 4 data-parallelism-accelerate.py"
                                " --prompt 'a red fox'` uses them all"]


@pytest.mark.parametrize("devices, processes, machines", [(1, 1, 1), (2, 2, 1), (2, 2, 2), (4, 3, 1)])
def test_a_launch_that_fits_the_gpus_says_nothing(data_parallel, monkeypatch, capsys, devices, processes, machines):
    assert launch(data_parallel, monkeypatch, capsys, devices=devices, processes=processes,
                  machines=machines) == ("", None)


def test_device_cpu_skips_the_gpu_launch_checks(data_parallel, monkeypatch, capsys):
    assert launch(data_parallel, monkeypatch, capsys, devices=1, processes=2, backends=(), device="cpu") == ("", None)


# --- no time limit on a legitimate wait ---


def test_a_process_that_is_done_can_wait_for_the_others_for_days(data_parallel, monkeypatch, tiny_sd3, tmp_path):
    """The group's timeout: NCCL's default (10 minutes) would end a job whose other processes still load or
    generate while one waits in gather_object. Checked at the calls that form the group (process 0 of 2, on the
    CPU), since no test can wait that long."""
    asked = {}

    class Stop(Exception):
        pass

    def rendezvous(url, **kwargs):
        asked["rendezvous"] = (url, kwargs)
        yield torch.distributed.HashStore(), 0, 2

    def init_process_group(backend, **kwargs):
        asked.update(backend=backend, **kwargs)
        raise Stop

    monkeypatch.setattr(torch.distributed, "rendezvous", rendezvous)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    for name, value in launched_as(0).items():
        monkeypatch.setenv(name, value) if value is not None else monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["data-parallelism-accelerate.py", "--model", str(tiny_sd3), "--output-dir",
                                      str(tmp_path / "out"), "--device", "cpu"])
    with pytest.raises(Stop):
        data_parallel.main()
    assert asked["backend"] == "cpu:gloo" and (asked["rank"], asked["world_size"]) == (0, 2)
    week = timedelta(days=1)
    assert asked["timeout"] >= week > max(default_pg_nccl_timeout, default_pg_timeout)
    assert asked["rendezvous"][0] == "env://" and asked["rendezvous"][1]["timeout"] >= week


# --- on real GPUs: skipped where there are none ---

GPU_TOLERANCE = 8  # of 255: float32 on a GPU rounds differently from the CPU (TF32 convolutions on NVIDIA)


def accelerate_on(n, *script_args):
    """The launch the script's note suggests: --multi_gpu needs 2 processes or more."""
    return [BIN / "accelerate", "launch", *(["--multi_gpu"] if n > 1 else []), "--num_processes", n,
            "--num_machines", 1, "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            free_port(), DATA_PARALLEL, *script_args]


@accelerator
@pytest.mark.parametrize("launcher", [torchrun, accelerate_on], ids=["torchrun", "accelerate"])
def test_one_process_per_gpu_makes_the_images_of_a_cpu_run(launcher, tiny_sd3, tmp_path):
    n, kind = torch.accelerator.device_count(), torch.accelerator.current_accelerator().type
    prompts = [a for i in range(2 * n + 1) for a in ("--prompt", f"prompt number {i}")]
    common = ["--model", tiny_sd3, *prompts, *FAST, "--dtype", "float32"]
    run(python(DATA_PARALLEL, *common, "--device", "cpu", "--output-dir", tmp_path / "cpu"))
    if launcher is torchrun:
        run(torchrun(n, DATA_PARALLEL, *common, "--output-dir", tmp_path / "gpu"))
    else:
        run(accelerate_on(n, *common, "--output-dir", tmp_path / "gpu"))
    on_gpus, on_cpu = read_manifest(tmp_path / "gpu"), read_manifest(tmp_path / "cpu")
    # Every GPU made its share (one process alone, without a launcher's rank, says "cuda" rather than "cuda:0").
    devices = {torch.device(r["device"]) for r in on_gpus}
    assert {d.type for d in devices} == {kind} and len(devices) == n
    assert {r["device"] for r in on_cpu} == {"cpu"}
    assert [r["file_name"] for r in on_gpus] == [r["file_name"] for r in on_cpu]
    for r in on_gpus:
        gpu, cpu = pixels(tmp_path / "gpu" / r["file_name"]), pixels(tmp_path / "cpu" / r["file_name"])
        assert np.abs(gpu - cpu).max() <= GPU_TOLERANCE, r["file_name"]


@accelerator
def test_more_processes_than_gpus_stop_before_any_collective(tiny_sd3, tmp_path):
    n = torch.accelerator.device_count()
    result = run(torchrun(n + 1, DATA_PARALLEL, "--model", tiny_sd3, *FAST, "--output-dir", tmp_path / "out"),
                 check=False, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count(f"error: {n + 1} processes on this machine, but it has {n} ") == 1
    assert "Duplicate GPU" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


@accelerator
@pytest.mark.skipif(torch.accelerator.device_count() < 2, reason="needs 2 GPUs or more")
def test_one_process_on_a_machine_with_several_gpus_notes_the_command_and_runs(tiny_sd3, tmp_path):
    n = torch.accelerator.device_count()
    result = run(python(DATA_PARALLEL, "--model", tiny_sd3, *FAST, "--output-dir", tmp_path / "out"))
    assert f"note: this machine has {n} " in result.stderr
    assert f"accelerate launch --multi_gpu --num_processes {n} data-parallelism-accelerate.py" in result.stderr
    assert len(read_manifest(tmp_path / "out")) == 4  # the default prompts, all made


@accelerator
def test_device_cpu_beside_the_gpus_runs_each_scripts_readme_command(tiny, tmp_path):
    """The README's tiny commands, --device cpu as written, on this machine's real GPUs (elsewhere the suite makes
    them on simulated ones, tests/test_readme.py: ON_SIMULATED_GPUS): the CPU on purpose, beside 1 GPU or several,
    2 processes too, whatever the GPUs' count."""
    from tests.test_readme import (CFG_TORCHRUN_TINY, CP_TORCHRUN_TINY, DP_ACCELERATE_TINY, MP_TINY, as_test,
                                   page_lines)

    for n, line in enumerate([DP_ACCELERATE_TINY, MP_TINY, CP_TORCHRUN_TINY, CFG_TORCHRUN_TINY]):
        assert line in page_lines() and "--device cpu" in line
        out = tmp_path / str(n)
        result = run(as_test(shlex.split(line), tiny, out, free_port()), timeout=600)
        assert "Traceback" not in result.stderr
        made = list(out.glob("out/[0-9]*.png")) if "data-parallelism" in line else [out / "out.png"]
        assert made and all(pixels(path).shape == (64, 64, 3) for path in made), line


@accelerator
def test_two_processes_on_one_real_gpu_are_refused_in_one_line(tiny_sd3, tmp_path):
    """The first GPU alone, shown to the 2 processes of a launch by a mask: one line, before NCCL or XCCL starts
    (its own error would be "Duplicate GPU detected", a traceback from each process)."""
    kind = torch.accelerator.current_accelerator().type
    mask = {"cuda": "CUDA_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}[kind]
    first = (os.environ.get(mask) or "0").split(",")[0]
    result = run(torchrun(2, DATA_PARALLEL, "--model", tiny_sd3, *FAST, "--output-dir", tmp_path / "out"),
                 check=False, timeout=120, env={mask: first})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: ranks 0 and 1 would both run on {kind}:0 "), errors
    assert "Duplicate GPU" not in result.stderr and f'File "{DATA_PARALLEL}"' not in result.stderr
    assert not (tmp_path / "out").exists()


@accelerator
@pytest.mark.skipif(torch.accelerator.device_count() < 2, reason="needs 2 GPUs or more")
def test_a_mask_per_process_runs_each_on_its_own_gpu(tiny_flux, tmp_path):
    """A launcher that gives each process its own GPU by a mask (Slurm's --gpus-per-task=1; here a wrapper that
    sets the mask to the local rank's GPU): each sees one GPU, as device 0, and the context parallel run, with its
    barrier on that device, makes the image one process makes."""
    kind = torch.accelerator.current_accelerator().type
    mask = {"cuda": "CUDA_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}[kind]
    visible = (os.environ.get(mask) or ",".join(map(str, range(torch.accelerator.device_count())))).split(",")
    wrapper = tmp_path / "a_gpu_each.py"
    wrapper.write_text(f"import os, sys\nos.environ[{mask!r}] = {visible!r}[int(os.environ['LOCAL_RANK'])]\n"
                       "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n")
    args = ["--model", tiny_flux, *FAST, "--dtype", "float32"]
    run(python(ROOT / "context-parallelism-flux.py", *args, "--output", tmp_path / "one.png"))
    result = run(torchrun(2, wrapper, ROOT / "context-parallelism-flux.py", *args, "--output", tmp_path / "two.png"))
    assert f"rank 0 on {kind}:0" in result.stdout and f"rank 1 on {kind}:0" in result.stdout  # device 0 each
    assert np.abs(pixels(tmp_path / "two.png") - pixels(tmp_path / "one.png")).max() <= GPU_TOLERANCE


@pytest.mark.skipif(torch.accelerator.is_available(), reason="needs a machine where torch sees no GPU")
@pytest.mark.parametrize("script_path, plan", [
    (DATA_PARALLEL, ["--model", ROOT / "tests" / "fixtures" / "sd3.5-medium", "--device-memory", "12GiB"]),
    (ROOT / "model-parallelism-flux.py", ["--model", ROOT / "tests" / "fixtures" / "flux1-dev", "--num-devices", "2",
                                          "--device-memory", "24GiB"]),
], ids=["data-parallelism", "model-parallelism"])
def test_a_plan_for_other_gpus_runs_on_a_machine_whose_gpu_torch_cannot_use(script_path, plan, tmp_path):
    result = main_on(fake_sysfs(tmp_path, INTEL_GPU), script_path, "--plan", *plan, check=True)
    assert "fits: yes" in result.stdout and not result.stderr


# --- bfloat16 only where the GPU computes it natively: float16 on NVIDIA GPUs before Ampere ---


def simulate_nvidia(monkeypatch, name, native_bfloat16):
    """A machine with NVIDIA GPUs, as torch sees them: a V100 (Volta: bfloat16 by emulation only) or an A100."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or (
        native_bfloat16))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("name, native, dtype", [("Tesla V100-SXM2-16GB", False, torch.float16),
                                                 ("NVIDIA A100-SXM4-80GB", True, torch.bfloat16)])
def test_auto_dtype_is_float16_on_gpus_without_native_bfloat16(script, monkeypatch, capsys, name, native, dtype):
    simulate_nvidia(monkeypatch, name, native)
    assert script.default_dtype(on_gpu=True, announce=True) == dtype
    said = capsys.readouterr().err.splitlines()
    assert said == ([] if native else [f"note: {name} has no fast bfloat16: using float16 (--dtype bfloat16 to "
                                       "override)"])
    assert script.default_dtype(on_gpu=False) == torch.float32


def test_a_plan_for_gpus_this_machine_lacks_is_in_bfloat16(script, monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert script.default_dtype(on_gpu=True) == torch.bfloat16


@pytest.mark.parametrize("script_path, plan", [
    (DATA_PARALLEL, ["--model", ROOT / "tests" / "fixtures" / "sd3.5-medium", "--device-memory", "16GiB"]),
    (ROOT / "model-parallelism-flux.py", ["--model", ROOT / "tests" / "fixtures" / "flux1-dev", "--num-devices", "2",
                                          "--device-memory", "24GiB"]),
], ids=["data-parallelism", "model-parallelism"])
@pytest.mark.parametrize("asked, dtype", [([], "float16"), (["--dtype", "bfloat16"], "bfloat16")])
def test_the_run_on_a_v100_is_in_float16_unless_asked(script_path, plan, asked, dtype, monkeypatch, capsys):
    script = load_script(script_path)
    simulate_nvidia(monkeypatch, "Tesla V100-SXM2-16GB", native_bfloat16=False)
    monkeypatch.setattr(sys, "argv", [script_path.name, "--plan", "--json", *map(str, plan), *asked])
    script.main()
    assert json.loads(capsys.readouterr().out)["dtype"] == dtype


# --- peak memory as nvidia-smi and xpu-smi see it: reserved, not only allocated ---


@pytest.fixture
def gpu_memory_of(monkeypatch):
    """A GPU on which torch's tensors held at most 3 GiB and its caching allocator 5 GiB (now 1 and 2 GiB)."""
    GiB = 2**30
    monkeypatch.setattr(torch.accelerator, "max_memory_allocated", lambda device=None: 3 * GiB)
    monkeypatch.setattr(torch.accelerator, "max_memory_reserved", lambda device=None: 5 * GiB)
    monkeypatch.setattr(torch.accelerator, "memory_allocated", lambda device=None: 1 * GiB)
    monkeypatch.setattr(torch.accelerator, "memory_reserved", lambda device=None: 2 * GiB)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("xpu"))


def test_the_data_parallel_report_names_allocated_and_reserved_peaks(data_parallel, gpu_memory_of, capsys, tmp_path):
    stats = [{"rank": 1, "ranks": [1], "device": "xpu:1", "images": 2, "generate_seconds": 4.0,
              **data_parallel.peak_memory(torch.device("xpu", 1))}]
    assert stats[0]["peak_device_allocated_gib"] == 3.0 and stats[0]["peak_device_reserved_gib"] == 5.0
    data_parallel.report(argparse.Namespace(output_dir=tmp_path), stats, 0, 10.0, None)
    line = next(line for line in capsys.readouterr().out.splitlines() if "rank 1" in line)
    assert line.endswith("peak device memory 3.00 GiB allocated, 5.00 GiB reserved")
    assert json.loads((tmp_path / "summary.json").read_text())["ranks"][0]["peak_device_reserved_gib"] == 5.0


def test_the_sharding_script_names_allocated_and_reserved_memory(gpu_memory_of):
    script = load_script(ROOT / "model-parallelism-flux.py")
    peak, now = script.memory_in_use([0, 1, "cpu"], peak=True), script.memory_in_use([0], peak=False)
    assert script.memory_text(1, peak[1]) == "xpu:1 3.00 GiB allocated, 5.00 GiB reserved"
    assert script.memory_text(0, now[0]) == "xpu:0 1.00 GiB allocated, 2.00 GiB reserved"
    assert script.memory_text("cpu", peak["cpu"]).startswith("cpu ") and "allocated" not in script.memory_text(
        "cpu", peak["cpu"])
