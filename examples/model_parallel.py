# Model parallelism on one page: one copy of FLUX.1-dev spread over every GPU present, one image.
# `uv run examples/model_parallel.py`; the full script (cards of 12 to 24 GB too): model-parallelism-flux.py
import torch
from diffusers import DiffusionPipeline

# "balanced" puts each whole component (transformer, T5, CLIP, VAE), largest first, on the next GPU in turn.
# With no GPU it places nothing and leaves hf_device_map None: all on the CPU, in float32.
on_gpu = torch.accelerator.is_available()
pipeline = DiffusionPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", device_map="balanced",
                                             dtype=torch.bfloat16 if on_gpu else torch.float32)
placement = pipeline.hf_device_map or {name: module.device for name, module in pipeline.components.items()
                                       if isinstance(module, torch.nn.Module)}
for name, device in placement.items():
    print(f"{name} -> {device}")  # a GPU's index (0, 1, ...), or the CPU

# Accelerate's hooks move the activations from GPU to GPU: the GPUs take turns on the one image.
image = pipeline("A cat holding a sign that says hello world", height=512, width=512, guidance_scale=3.5,
                 num_inference_steps=28, generator=torch.Generator("cpu").manual_seed(0)).images[0]
image.save("flux-dev.png")
print("saved flux-dev.png")
