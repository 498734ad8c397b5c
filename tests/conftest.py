"""Shared fixtures: tiny offline pipelines, and running the scripts the way a user does (in a subprocess), or their
main() in this process where that gives the user-facing result just as well (run_main)."""

import contextlib
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

# Offline in this process too (the tests that run a script's main() here): huggingface_hub reads it once, on import.
os.environ["HF_HUB_OFFLINE"] = "1"
# One thread a process, in the tests' own processes and in every process they start (offline_env copies it), as
# torchrun gives its workers. The suite runs a worker a core (pytest-xdist's -n auto), and each worker's test starts
# processes beside the other workers': with torch's default, a thread a core in every process, they take turns on the
# same cores and spin while they wait (measured: the data, model parallel and memory tests took 13% less time with one
# thread). Nothing in the tests measures a speed.
os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np
import psutil
import pytest
import torch
from accelerate import PartialState
from PIL import Image

from utils import tiny_pipelines

torch.set_num_threads(1)  # OMP_NUM_THREADS above, where torch was imported before this file (a plugin)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the project's virtual environment: accelerate and torchrun live here
DATA_PARALLEL = ROOT / "data-parallelism-accelerate.py"
IMAGES = "[0-9]*-*.png"  # the data parallel script's images, 000-<prompt>.png ..., not its contact sheet
SIMULATE = ROOT / "tests" / "simulate"  # sitecustomize.py: simulated GPUs, hangs, kills, full disks (its docstring)


def probe_env(folder, code):
    """The environment that runs CODE at the start of every Python process of a run: a probe inside the processes
    (Python imports `sitecustomize` from the first folder on PYTHONPATH that has one). It runs after
    tests/simulate/sitecustomize.py, so that a probed run can also be simulated (FAKE_GPUS=..., STALL_RANK=...)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        f"exec(compile(open({str(SIMULATE / 'sitecustomize.py')!r}).read(), 'simulate', 'exec'))\n\n" + code,
        encoding="utf-8")
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(SIMULATE)])}


def simulated_gpus(monkeypatch, count, kind="cuda", fp64=True):
    """This test's process on a machine with `count` GPUs of `kind`, as torch answers about them at every depth the
    libraries ask (tests/simulate/fake_gpus.py), until the test ends. Returns the physical GPUs a mask leaves."""
    from tests.simulate import fake_gpus

    return fake_gpus.simulate(count, kind, fp64, patch=lambda owner, name, value: monkeypatch.setattr(
        owner, name, value, raising=False))


def accelerator(test):
    """A test that needs a GPU (Intel XPU or NVIDIA CUDA): marked `gpu` (`uv run pytest -m gpu` runs these alone),
    and skipped, reported as skipped, where there is none. The GPU tests run one at a time, on one pytest-xdist
    worker: two at once would share the GPUs, and the timings some of them compare."""
    skip = pytest.mark.skipif(not torch.accelerator.is_available(), reason="needs a GPU (torch.accelerator)")
    return pytest.mark.xdist_group("gpu")(pytest.mark.gpu(skip(test)))


COLLECTED = pytest.StashKey[list]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Keep every test collected, before `-m` or `-k` deselect any (tests/test_the_tests.py checks the gpu marker
    on them)."""
    config.stash[COLLECTED] = list(items)


def offline_env(**extra):
    # SYSFS_PCI_DEVICES: where the scripts look for GPUs that torch cannot use. The tests show them none (a test
    # of that check passes its own fake tree), so that they run alike on a laptop whose Intel GPU PyPI's torch
    # cannot use.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "SYSFS_PCI_DEVICES": os.devnull, **extra}
    # Run the scripts as on a user's machine, where Python caches the libraries' bytecode: a CI machine that
    # sets PYTHONDONTWRITEBYTECODE would otherwise compile torch, diffusers and transformers in every process.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run(args, timeout=300, check=True, env=None, cwd=ROOT, **kwargs):
    """Run a command from the repository root, offline (plus `env`); fail the test with its output if it fails, or
    if it is still running after `timeout` seconds: then every process it started is killed too (a launcher's
    workers run in sessions of their own, which killing the launcher alone would leave running)."""
    with subprocess.Popen([str(a) for a in args], cwd=cwd, env=offline_env(**(env or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_with_its_children(process.pid)
            stdout, stderr = process.communicate()
            pytest.fail(f"{' '.join(map(str, args))} still ran after {timeout} s\n{stdout}\n{stderr}")
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def kill_with_its_children(pid):
    """SIGKILL a process and every process below it."""
    try:
        parent = psutil.Process(pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_main(script, *args, check=False, **env):
    """Run a script's main() in this process, as `python SCRIPT ARGS...` would run it, with the same environment
    as `run` (plus `env`; a variable given as None is unset): its exit code and what it printed; with `check`, fail
    the test with what it printed if it exits non-zero, as `run` does. For what ends
    before any weight is loaded or any process group is formed (bad input, --plan, the checks): the same
    user-facing result as a subprocess, without its 5-8 s of imports; and for a whole single-process run whose
    files and own lines are what a test checks (no launcher, no process group). The libraries' own log lines go to
    this process's stderr, not to the result: the tests that the whole output is one line keep a subprocess run of
    each script for that."""
    module = load_script(Path(script))
    stdout, stderr = io.StringIO(), io.StringIO()
    environment = {name: value for name, value in offline_env(**env).items() if value is not None}  # None: unset
    with (mock.patch.dict(os.environ, environment, clear=True), mock.patch.object(sys, "argv", [
            str(script), *map(str, args)]), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr)):
        try:
            module.main()
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
        finally:  # a main() that got as far as PartialState leaves Accelerate's shared state set: not for the next
            PartialState._reset_state()
    if check and code != 0:
        pytest.fail(f"{script} {' '.join(map(str, args))} exited {code}\n{stdout.getvalue()}\n{stderr.getvalue()}")
    return Result(code, stdout.getvalue(), stderr.getvalue())


def launched_as(rank, processes=2):
    """The variables a launcher sets in process RANK of PROCESSES on one machine, for run_main to run main() as that
    process; with no rendezvous address, so that a main() that reached a process group would raise, not wait."""
    return dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes),
                MASTER_ADDR=None, MASTER_PORT=None)


def assert_clear_error(result, *expected):
    """A bad input: one line on stderr saying what to do, a non-zero exit, no traceback."""
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for text in expected:
        assert text in lines[0]


def assert_one_report_with_every_process(stdout, processes=2):
    """The scripts that make one image together: one report, by the main process, with the time per step, the time
    since the start, and the peak memory of each process."""
    assert stdout.count("made ") == 1 and "s per step" in stdout and "since the start" in stdout
    assert all(f"rank {rank} on cpu" in stdout for rank in range(processes))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python(script, *args):
    return [sys.executable, script, *args]


def torchrun(n, script, *args):
    return [BIN / "torchrun", "--nproc-per-node", n, "--master-addr", "127.0.0.1", "--master-port", free_port(),
            script, *args]


def accelerate_launch(n, script, *args):
    # With no GPU, `--multi_gpu` is what makes accelerate start several (CPU) processes.
    return [BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", n, "--num_machines", 1,
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(), script, *args]


def read_manifest(folder):
    return [json.loads(line) for line in (Path(folder) / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def load_script(path):
    """Import a top-level script (its file name has dashes) as a module, for unit tests of its helpers."""
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    return tiny_pipelines.build_sd3(tmp_path_factory.mktemp("tiny") / "sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    return tiny_pipelines.build_flux(tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture(scope="session")
def tiny_qwenimage(tmp_path_factory):
    return tiny_pipelines.build_qwenimage(tmp_path_factory.mktemp("tiny") / "qwenimage")


@pytest.fixture(scope="session")
def tiny(tiny_sd3, tiny_flux, tiny_qwenimage):
    """The tiny pipelines, by the names the pages give them (`tiny/sd3`, `tiny/flux`, `tiny/qwenimage`:
    tests/test_readme.py)."""
    return {"sd3": tiny_sd3, "flux": tiny_flux, "qwenimage": tiny_qwenimage}
