"""Test-only: torch believes this machine has FAKE_GPUS NVIDIA GPUs (tests/test_the_tests.py).

Python imports `sitecustomize` at start-up from the first folder on its path that has one: the tests of the tests
put this folder on PYTHONPATH, so that pytest and every script it starts see the same simulated machine. It
changes nothing unless FAKE_GPUS is set. The simulated GPUs cannot compute: a test that really uses a GPU is
marked `gpu`, and the tests of the tests leave those out (-m "not gpu")."""

import os

if os.environ.get("FAKE_GPUS"):
    import torch

    _count = int(os.environ["FAKE_GPUS"])
    torch.accelerator.is_available = lambda: True
    torch.accelerator.device_count = lambda: _count
    torch.accelerator.current_accelerator = lambda check_available=False: torch.device("cuda")
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: _count
    torch.cuda.is_bf16_supported = lambda including_emulation=True: True  # GPUs of today
