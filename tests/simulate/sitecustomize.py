"""Test-only simulations and probes, for every Python process started with this folder on PYTHONPATH (Python imports
`sitecustomize` at start-up from the first folder on its path that has one). Each does nothing unless its
environment variable is set:

- FAKE_GPUS=N: torch believes this machine has N GPUs, down to what torch.distributed asks its C++ side
  (tests/simulate/fake_gpus.py): NVIDIA's, or Intel's with FAKE_ACCELERATOR=xpu; without FP64 with FAKE_NO_FP64=1.
  FAKE_MASK_PER_PROCESS=1: each launched process is shown only the GPU of its local rank (CUDA_VISIBLE_DEVICES or
  ZE_AFFINITY_MASK set to it), as Slurm's --gpus-per-task=1 or a wrapper script does: each sees one GPU, index 0.
  FAKE_GPUS_SEEN=FOLDER: each process writes there what torch told it (the proof that a run was simulated). The
  GPUs cannot compute: a test that really uses a GPU is marked `gpu` (tests/test_the_tests.py).
- HANG_RANK=R: the process of rank R (the launcher's RANK) hangs when it saves its first image, as a process whose
  GPU or file system stopped responding (tests/test_long_runs.py).
- KILL_RANK_WRITING=R: the process of rank R is killed (SIGKILL, as by the kernel's out-of-memory killer or a
  power cut) half-way through writing its third image: half of the PNG's bytes are on disk, and nothing of the
  process runs after (tests/test_long_runs.py).
- FULL_DISK_AFTER=N: the disk fills up while the process writes its image N + 1: half of its bytes are on disk,
  then the write fails with ENOSPC, as on a real disk (tests/test_long_runs.py, where no tmpfs can be mounted).
- STALL_RANK=R: the process of rank R stops in its second denoising step (the flow-matching scheduler's `step`,
  which SD3, FLUX.1 and QwenImage use, sleeps for an hour), as a process whose GPU stopped responding, while the
  others wait for it in the next collective (tests of the context parallel and CFG parallel scripts).
- PROBE_GROUP_AT_EXIT=1: at exit, a process still in a process group says so on stderr.
"""

import os

if os.environ.get("FAKE_GPUS"):
    import fake_gpus

    _kind = os.environ.get("FAKE_ACCELERATOR", "cuda")
    if os.environ.get("FAKE_MASK_PER_PROCESS") and "LOCAL_RANK" in os.environ:  # before torch reads the mask
        os.environ[fake_gpus.MASKS[_kind]] = os.environ["LOCAL_RANK"]
    fake_gpus.simulate(int(os.environ["FAKE_GPUS"]), _kind, fp64=not os.environ.get("FAKE_NO_FP64"))
    if os.environ.get("FAKE_GPUS_SEEN"):
        fake_gpus.record(os.environ["FAKE_GPUS_SEEN"])

if os.environ.get("HANG_RANK") is not None and os.environ.get("RANK") == os.environ["HANG_RANK"]:
    import time

    from PIL import Image

    Image.Image.save = lambda self, *args, **kwargs: time.sleep(3600)

_killed = os.environ.get("KILL_RANK_WRITING") is not None and os.environ.get("RANK") == os.environ["KILL_RANK_WRITING"]
if _killed or os.environ.get("FULL_DISK_AFTER"):
    import errno
    import io
    import signal

    from PIL import Image

    _save, _saved, _cut_at = Image.Image.save, [], 2 if _killed else int(os.environ["FULL_DISK_AFTER"])

    def _cut_short_while_writing(self, fp, *args, **kwargs):
        if len(_saved) == _cut_at:  # half of this image's bytes reach the disk, then the write stops
            data = io.BytesIO()
            _save(self, data, *args, **kwargs)
            with open(fp, "wb") as file:
                file.write(data.getvalue()[:len(data.getvalue()) // 2])
            if _killed:
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        _saved.append(fp)
        return _save(self, fp, *args, **kwargs)

    Image.Image.save = _cut_short_while_writing

if os.environ.get("STALL_RANK") is not None and os.environ.get("RANK") == os.environ["STALL_RANK"]:
    import time

    from diffusers import FlowMatchEulerDiscreteScheduler

    _step, _steps = FlowMatchEulerDiscreteScheduler.step, []

    def _stop_at_the_second_step(self, *args, **kwargs):
        _steps.append(1)
        if len(_steps) == 2:
            time.sleep(3600)
        return _step(self, *args, **kwargs)

    FlowMatchEulerDiscreteScheduler.step = _stop_at_the_second_step

if os.environ.get("PROBE_GROUP_AT_EXIT"):
    import atexit
    import sys

    def _probe():
        torch = sys.modules.get("torch")
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            print(f"probe: rank {os.environ.get('RANK')} exits still in its process group", file=sys.stderr,
                  flush=True)

    atexit.register(_probe)
