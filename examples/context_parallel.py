# Context parallelism on one page: one image made by several GPUs, each on 1/N of its tokens.
# `uv run torchrun --nproc-per-node 2 examples/context_parallel.py`; the full script: context-parallelism-flux.py
import contextlib
import unittest.mock

import torch
from accelerate import PartialState
from diffusers import ContextParallelConfig, DiffusionPipeline

# One process per GPU, started by torchrun or accelerate launch; with no GPU, a gloo group of CPU processes.
on_gpu = torch.accelerator.is_available()
distributed_state = PartialState(cpu=not on_gpu)
pipeline = DiffusionPipeline.from_pretrained("black-forest-labs/FLUX.1-dev",
                                             dtype=torch.bfloat16 if on_gpu else torch.float32)
pipeline.to(distributed_state.device)  # the WHOLE pipeline on every process's own device

# Split the transformer's tokens between the processes; each attention swaps them with all-to-alls (Ulysses).
# diffusers 0.42 picks a device as `rank % torch.accelerator.device_count()`, 0 on a CPU: count one while it does.
with contextlib.nullcontext() if on_gpu else unittest.mock.patch("torch.accelerator.device_count", return_value=1):
    config = ContextParallelConfig(ulysses_degree=distributed_state.num_processes)
    pipeline.transformer.enable_parallelism(config=config)

# Every process runs the same call with the same seed; the whole image comes out in each, one process saves it.
image = pipeline("A cat holding a sign that says hello world", guidance_scale=3.5,
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]
if distributed_state.is_main_process:
    image.save("flux-dev-context-parallel.png")
distributed_state.destroy_process_group()
