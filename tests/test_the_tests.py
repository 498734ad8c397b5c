"""Tests of the tests: `uv run pytest` must pass on a machine with 1 GPU or several, not only on this CPU-only one,
and what a user's GPU machine does must be seen here.

tests/simulate/fake_gpus.py makes torch see GPUs, NVIDIA's or Intel's, down to what torch.distributed asks torch's
C++ side; they cannot compute, so the tests that really use a GPU (marked `gpu`) are left out. Two uses:
- The pages' commands that the suite makes anyway are made on simulated machines (tests/test_readme.py:
  ON_SIMULATED_GPUS): each script on the CPU (--device cpu) beside 1 GPU and beside 2, NVIDIA's and Intel's, and with
  a mask that gives each process a GPU of its own; each run checks that its processes saw those GPUs. Checked below:
  that this covers every script and each kind of machine.
- The tests that read the machine are run again in a fresh pytest, on machines with 1 and 2 simulated GPUs: the
  pages' commands with GPU memory budgets, and bad input answered with exactly one line.
"""

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import COLLECTED, ROOT, run

SIMULATE = ROOT / "tests" / "simulate"
# The tests that read the machine's GPUs (their results depend on what torch sees): they must pass with 1 and 2.
ON_ANY_MACHINE = [
    "tests/test_readme.py::test_every_readme_command_runs[model-parallelism-flux.py --max-memory 0=12GiB,1=24GiB]",
    "tests/test_readme.py::test_every_readme_command_runs[model-parallelism-flux.py --max-memory "
    "0=16GiB,1=16GiB,cpu=32GiB]",
    "tests/test_memory_modes.py::test_bad_memory_options_get_one_clear_line",
    "tests/test_model_parallelism.py::test_max_memory_naming_a_device_that_is_not_there_is_a_clear_error",
    "tests/test_model_parallelism.py::test_devices_with_no_room_beyond_the_activations_reserve_are_a_clear_error",
]


def pytest_on(gpus, kind, *args):
    env = {**os.environ, "FAKE_GPUS": str(gpus), "FAKE_ACCELERATOR": kind, "PYTHONPATH": os.pathsep.join(
        [str(SIMULATE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_every_script_runs_on_the_cpu_beside_simulated_gpus_of_each_kind():
    """ON_SIMULATED_GPUS covers, for every script, --device cpu beside 1 GPU and beside 2, NVIDIA's and Intel's; and
    a mask per process, with each kind, for scripts that form a group."""
    from tests.test_readme import ON_SIMULATED_GPUS, SCRIPTS, as_test, page_lines, runs_alike

    seen = {script: set() for script in SCRIPTS}
    for line, machine in ON_SIMULATED_GPUS.items():
        assert line in page_lines(), line
        argv = [str(word) for word in as_test(shlex.split(line, comments=True), {"sd3": "S", "flux": "F",
                                                                                   "qwenimage": "Q"}, ROOT, 0)]
        assert argv[-2:] == ["--device", "cpu"] or " --device cpu" in " ".join(argv), line
        script = next(Path(word).name for word in argv if Path(word).name in SCRIPTS)
        seen[script] |= {("gpus", machine["FAKE_GPUS"]), ("kind", machine["FAKE_ACCELERATOR"])}
        if machine.get("FAKE_MASK_PER_PROCESS"):
            seen[script].add(("mask", machine["FAKE_ACCELERATOR"]))
    for script, covered in seen.items():
        assert {("gpus", "1"), ("gpus", "2"), ("kind", "cuda"), ("kind", "xpu")} <= covered, script
    assert {kind for covered in seen.values() for what, kind in covered if what == "mask"} == {"cuda", "xpu"}
    lines = list(ON_SIMULATED_GPUS)  # no two of them the same run
    assert len({runs_alike(shlex.split(line, comments=True), ROOT) for line in lines}) == len(lines)


@pytest.mark.parametrize("kind", ["cuda", "xpu"])
def test_the_simulation_makes_torch_see_the_gpus_down_to_its_cpp_side(kind):
    """What the scripts and Accelerate ask (torch.accelerator) and what torch.distributed's barrier and diffusers'
    mesh ask (torch._C._get_accelerator), alike; a mask hides what it does not name, and a GPU keeps its UUID."""
    probe = ("import torch; print(torch.accelerator.is_available(), torch.accelerator.device_count(), "
             "torch._C._get_accelerator().type, torch.accelerator.current_accelerator().type, "
             "torch.get_device_module(torch.accelerator.current_accelerator()).get_device_properties(0).uuid)")
    mask = {"cuda": "CUDA_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}[kind]
    env = {**os.environ, "FAKE_GPUS": "3", "FAKE_ACCELERATOR": kind, "PYTHONPATH": str(SIMULATE), mask: "2,0"}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["True", "2", kind, kind, "GPU-5eed0000-0000-4000-8000-000000000002"], result.stderr


@pytest.mark.parametrize("gpus, kind", [(1, "cuda"), (2, "xpu")], ids=["1-nvidia-gpu", "2-intel-gpus"])
def test_the_tests_that_read_the_machine_pass_with_gpus(gpus, kind):
    result = pytest_on(gpus, kind, "-m", "not gpu", *ON_ANY_MACHINE)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_the_gpu_marker_selects_the_tests_written_for_a_gpu(request):
    """`-m gpu` selects the tests that carry the `gpu` marker: exactly those decorated @accelerator in the sources
    (and so `-m "not gpu"`, which deselects what the marker selects, none of them). Checked on this session's own
    collection, before `-m` or `-k` took any test out, in the test files it collected."""
    collected = request.config.stash[COLLECTED]
    files, names = {item.path for item in collected}, {item.originalname for item in collected}
    written = {name for path in files for name in re.findall(
        r"^@accelerator\n(?:@.*\n|\s.*\n)*?def (\w+)", path.read_text(encoding="utf-8"), flags=re.M)}
    if files == set((ROOT / "tests").glob("test_*.py")):  # the whole suite: the GPU tests of every script
        assert len(written) >= 8
    assert {item.originalname for item in collected if item.get_closest_marker("gpu")} == written & names


def test_a_run_that_times_out_leaves_no_process_behind():
    """conftest's run() kills what a command started when it times out, a launcher's workers in sessions of their
    own too: a test that times out (a hang the test is for, or a mutation) must not leave processes that load the
    machine for the rest of the suite."""
    sleeper = "import time; time.sleep(120)"
    code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}], "
            "start_new_session=True); time.sleep(120)")
    with pytest.raises(pytest.fail.Exception, match="still ran after 2 s"):
        run([sys.executable, "-c", code], timeout=2)
    time.sleep(0.5)
    assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == [sys.executable, "-c", sleeper]]
