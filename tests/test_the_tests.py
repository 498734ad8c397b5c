"""Tests of the tests: `uv run pytest` must pass on a machine with 1 GPU or several, not only on this CPU-only one.

The tests below run other tests in a fresh pytest, on a simulated machine: tests/simulate/sitecustomize.py makes
torch (in pytest and in every script it starts) see FAKE_GPUS NVIDIA GPUs. Those GPUs cannot compute, so the tests
that really use a GPU (marked `gpu`) are left out; what is run is the rest, which must hold on any machine: the
README's commands with GPU memory budgets, and bad input answered with exactly one line.
"""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import COLLECTED, ROOT

SIMULATE = ROOT / "tests" / "simulate"
# The tests that read the machine's GPUs (their results depend on what torch sees): they must pass with 1 and 2.
ON_ANY_MACHINE = [
    "tests/test_readme.py::test_every_readme_command_runs[model-parallelism-flux.py --max-memory 0=12GiB,1=24GiB]",
    "tests/test_readme.py::test_every_readme_command_runs[model-parallelism-flux.py --max-memory "
    "0=16GiB,1=16GiB,cpu=32GiB]",
    "tests/test_memory_modes.py::test_bad_memory_options_get_one_clear_line",
    "tests/test_model_parallelism.py::test_max_memory_naming_a_device_that_is_not_there_is_a_clear_error",
    "tests/test_model_parallelism.py::test_devices_with_no_room_beyond_the_activations_reserve_are_a_clear_error",
    "tests/test_cfg_parallelism.py::test_two_processes_make_the_image_diffusers_makes_and_one_process_makes"
    "[with_torchrun]",
]


def pytest_on(gpus, *args):
    env = {**os.environ, "FAKE_GPUS": str(gpus), "PYTHONPATH": os.pathsep.join(
        [str(SIMULATE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0", *args], cwd=ROOT,
                          env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_simulation_makes_torch_see_the_gpus():
    probe = "import torch; print(torch.accelerator.is_available(), torch.accelerator.device_count())"
    env = {**os.environ, "FAKE_GPUS": "3", "PYTHONPATH": str(SIMULATE)}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["True", "3"], result.stderr


@pytest.mark.parametrize("gpus", [1, 2], ids=["1-gpu", "2-gpus"])
def test_the_tests_that_read_the_machine_pass_with_gpus(gpus):
    result = pytest_on(gpus, "-m", "not gpu", *ON_ANY_MACHINE)
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
