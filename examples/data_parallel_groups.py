# Data parallelism over groups on one page: many images, each made by a group of 2 GPUs that split its tokens.
# `uv run torchrun --nproc-per-node 4 examples/data_parallel_groups.py`; the full script: data-parallelism-accelerate.py
import contextlib
import unittest.mock

import torch
from accelerate import PartialState
from diffusers import ContextParallelConfig, DiffusionPipeline
from torch.distributed.device_mesh import init_device_mesh

prompts = ["a dog in a field of sunflowers, golden hour", "a lighthouse on a cliff in a storm, oil painting",
           "a red fox in fresh snow, wildlife photograph", "a bowl of ramen on a wooden table, studio lighting"]

# The processes on a mesh: "data" counts the groups; the 2 processes of a group split each image's tokens (Ulysses).
on_gpu = torch.accelerator.is_available()
distributed_state = PartialState(cpu=not on_gpu)
mesh = init_device_mesh(distributed_state.device.type, (distributed_state.num_processes // 2, 1, 2),
                        mesh_dim_names=("data", "ring", "ulysses"))
pipeline = DiffusionPipeline.from_pretrained("black-forest-labs/FLUX.1-dev",
                                             dtype=torch.bfloat16 if on_gpu else torch.float32)
pipeline.to(distributed_state.device)  # the WHOLE pipeline on every process's own device
with contextlib.nullcontext() if on_gpu else unittest.mock.patch("torch.accelerator.device_count", return_value=1):
    config = ContextParallelConfig(ulysses_degree=2, mesh=mesh["ring", "ulysses"])  # within this process's group
    pipeline.transformer.enable_parallelism(config=config)

# Each group makes a contiguous share of the prompts along "data", as split_between_processes shares them out.
for i in torch.arange(len(prompts)).tensor_split(mesh.size(0))[mesh.get_local_rank("data")].tolist():
    image = pipeline(prompts[i], guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(i)).images[0]
    if mesh.get_local_rank("ulysses") == 0:  # every process of the group has the image: its first saves it
        image.save(f"{i:03d}.png")
        print(f"{i:03d}.png made by processes {mesh['ulysses'].mesh.tolist()}")
distributed_state.destroy_process_group()
