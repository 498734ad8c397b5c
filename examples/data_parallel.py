# Data parallelism on one page: many images, a whole pipeline on every GPU, each its own share of the prompts.
# `uv run torchrun --nproc-per-node 2 examples/data_parallel.py`; the full script: data-parallelism-accelerate.py
import os

import torch
from accelerate import PartialState
from diffusers import DiffusionPipeline

prompts = ["a dog in a field of sunflowers, golden hour", "a lighthouse on a cliff in a storm, oil painting",
           "a red fox in fresh snow, wildlife photograph", "a bowl of ramen on a wooden table, studio lighting"]
seed = 0

# One process per GPU, each told its rank by the launcher. With no GPU, cpu=True joins the CPU processes
# into a group (gloo); without it each would think it is alone and make every image.
on_gpu = torch.accelerator.is_available()
distributed_state = PartialState(cpu=not on_gpu)
pipeline = DiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium",
                                             dtype=torch.bfloat16 if on_gpu else torch.float32)
pipeline.to(distributed_state.device)  # a whole copy of the pipeline on this process's own device
os.makedirs("outputs", exist_ok=True)

# Each process gets its own contiguous share of the (index, prompt) pairs: every prompt is made once.
with distributed_state.split_between_processes(list(enumerate(prompts))) as my_share:
    for i, prompt in my_share:
        # A CPU generator seeded seed + i: prompt i gets the same picture however many processes run.
        image = pipeline(prompt, generator=torch.Generator("cpu").manual_seed(seed + i)).images[0]
        image.save(f"outputs/{i:03d}.png")  # saved by the process that made it
        print(f"{i:03d}.png made by process {distributed_state.process_index} on {distributed_state.device}")
