# Sharded weights and context parallelism on one page: each GPU holds 1/N of the transformer, works on 1/N of it.
# `uv run torchrun --nproc-per-node 2 examples/sharded_context_parallel.py`; in full: context-parallelism-flux.py
import unittest.mock

import torch
from accelerate import PartialState
from diffusers import ContextParallelConfig, DiffusionPipeline
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

on_gpu = torch.accelerator.is_available()
distributed_state = PartialState(cpu=not on_gpu)  # one process per GPU; with no GPU, a gloo group of CPU processes
n, device = distributed_state.num_processes, distributed_state.device
pipeline = DiffusionPipeline.from_pretrained("black-forest-labs/FLUX.1-dev",  # read whole by each process, on the CPU
                                             dtype=torch.bfloat16 if on_gpu else torch.float32)

# FSDP2 over all N processes: each keeps 1/N of every block's weights on its device, and gathers them when it runs.
transformer, mesh = pipeline.transformer, init_device_mesh(device.type, (n,))
for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks, transformer]:
    fully_shard(block, mesh=mesh, reshard_after_forward=True)  # each block, then the rest of the transformer
pipeline.to(device)  # the text encoders and the VAE, whole

# Context parallelism on the same processes: each works on 1/N of the tokens (diffusers divides by the GPU count).
with unittest.mock.patch("torch.accelerator.device_count", return_value=max(1, torch.accelerator.device_count())):
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=n))
held = sum(p.to_local().numel() for p in transformer.parameters())
print(f"process {distributed_state.process_index} holds {held} of {transformer.num_parameters()} parameters")
image = pipeline("A cat holding a sign that says hello world", guidance_scale=3.5,
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]
if distributed_state.is_main_process:
    image.save("flux-dev-sharded.png")
distributed_state.destroy_process_group()
