# Sharded weights and context parallelism on one page: each GPU holds 1/N of the weights, works on 1/N of the tokens.
# `uv run torchrun --nproc-per-node 2 examples/sharded_context_parallel.py`; in full: context-parallelism-flux.py
import unittest.mock

import torch
from accelerate import PartialState
from diffusers import ContextParallelConfig, DiffusionPipeline
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

distributed_state = PartialState(cpu=not torch.accelerator.is_available())  # one process per GPU, or CPU processes
n, device = distributed_state.num_processes, distributed_state.device
pipeline = DiffusionPipeline.from_pretrained("black-forest-labs/FLUX.1-dev",  # read whole by each process, on the CPU
                                             dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)

# FSDP2: each process keeps 1/N of every block's weights, the transformer's and T5's, and gathers a block's to run it.
transformer, t5 = pipeline.transformer, pipeline.text_encoder_2
mesh = DeviceMesh.from_group(torch.distributed.new_group(), device.type)  # all N, a group apart from the all-to-alls
for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks, transformer,
              *t5.encoder.block, t5]:
    fully_shard(block, mesh=mesh, reshard_after_forward=True)  # each block, then the rest of its model
pipeline.to(device)  # CLIP and the VAE, whole
# Context parallelism on the same processes: each works on 1/N of the tokens (diffusers divides by the GPU count).
with unittest.mock.patch("torch.accelerator.device_count", return_value=max(1, torch.accelerator.device_count())):
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=n))
held = [f"{sum(p.to_local().numel() for p in m.parameters())} of {m.num_parameters()}" for m in (transformer, t5)]
print(f"process {distributed_state.process_index} holds {held[0]} parameters of the transformer, {held[1]} of T5")
image = pipeline("A cat holding a sign that says hello world", guidance_scale=3.5,
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]
if distributed_state.is_main_process:
    image.save("flux-dev-sharded.png")
distributed_state.destroy_process_group()
