# CFG parallelism on one page: one SD3.5 image by 2 GPUs, half of the guidance batch each, exchanged once a step.
# `uv run torchrun --nproc-per-node 2 examples/cfg_parallel.py`; the full script: cfg-parallelism-sd3.py
import torch
from accelerate import PartialState
from accelerate.utils import gather
from diffusers import StableDiffusion3Pipeline

# Two processes, one per GPU (torchrun --nproc-per-node 2); with no GPU, a gloo group of CPU processes.
distributed_state = PartialState(cpu=not torch.accelerator.is_available())
dtype = torch.bfloat16 if torch.accelerator.is_available() else torch.float32
pipeline = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium", dtype=dtype)
pipeline.to(distributed_state.device)  # a whole copy of the pipeline on this process's own device
GUIDANCE_BATCHED = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")


def take_my_half(module, args, kwargs):  # every call here is the guidance batch [negative, prompt]: rank 0 keeps
    rank = distributed_state.process_index  # the negative (unconditional) half, rank 1 the prompt's
    return args, {k: v.chunk(2)[rank] if k in GUIDANCE_BATCHED else v for k, v in kwargs.items()}


def gather_both_halves(module, args, kwargs, output):  # once a step: send my half's prediction, get the other's,
    return gather(output)  # in rank order: the batch of 2 that the pipeline's guidance expects


if distributed_state.num_processes == 2:
    pipeline.transformer.register_forward_pre_hook(take_my_half, with_kwargs=True)
    pipeline.transformer.register_forward_hook(gather_both_halves, with_kwargs=True)
image = pipeline("a red fox in fresh snow, wildlife photograph", num_inference_steps=40, guidance_scale=4.5,
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]  # the same noise in both processes
if distributed_state.is_main_process:
    image.save("sd3.5-cfg-parallel.png")
distributed_state.destroy_process_group()
