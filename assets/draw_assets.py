"""Redraw every image in assets/ from what the code really does. Run it after changing the scripts:

    uv run assets/draw_assets.py

- techniques.png, the README's picture: the six techniques side by side, what each GPU holds and what passes
  between the GPUs, from the scripts' own `--plan --json` for FLUX.1-dev and SD3.5-medium (tests/fixtures).
- data-parallelism-workflow.png, model-parallelism-workflow.png, context-parallelism-workflow.png: diagrams of the
  three techniques.
- model-sharding.png: the placement that `model-parallelism-flux.py --plan --json` computes for FLUX.1-dev
  (the real configs in tests/fixtures/flux1-dev, no weights) on 2 x 24 GiB, on 23.0 + 23.6 GiB and on 4 x 12 GiB.
- data-parallelism-output.png: a real run of data-parallelism-accelerate.py by 2 CPU processes on the tiny
  random-weight SD3 pipeline (its pictures are noise by design), each image labelled with the rank that made it;
  data-parallelism-contact-sheet.png: the contact sheet that run wrote, as it wrote it.
- accelerate-config.png: accelerate-config.txt, a terminal capture of `uv run accelerate config` answered for
  two Intel GPUs, drawn as a terminal.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw, ImageFont

ASSETS = Path(__file__).resolve().parent
ROOT = ASSETS.parent
sys.path.insert(0, str(ROOT))
from utils.tiny_pipelines import build_sd3  # noqa: E402

INK, PAPER, MUTED = "#1f2933", "#ffffff", "#7b8794"
BLUE, GREEN, ORANGE, PURPLE, GREY = "#d6e4ff", "#d3f2dc", "#ffe3c2", "#eadcff", "#eceff1"


def font(size, mono=False):
    path = "/usr/share/fonts/truetype/dejavu/DejaVuSans" + ("Mono" if mono else "") + ".ttf"
    return ImageFont.truetype(path, size) if os.path.exists(path) else ImageFont.load_default(size)


def box(draw, xy, text, fill, size=18, mono=False):
    draw.rounded_rectangle(xy, radius=10, fill=fill, outline=INK, width=2)
    x0, y0, x1, y1 = xy
    draw.multiline_text(((x0 + x1) / 2, (y0 + y1) / 2), text, fill=INK, font=font(size, mono), anchor="mm",
                        align="center", spacing=6)


def arrow(draw, start, end):
    draw.line([start, end], fill=INK, width=3)
    (x0, y0), (x1, y1) = start, end
    length = max(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5, 1)
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    draw.polygon([(x1, y1), (x1 - 14 * ux + 7 * uy, y1 - 14 * uy - 7 * ux),
                  (x1 - 14 * ux - 7 * uy, y1 - 14 * uy + 7 * ux)], fill=INK)


def title(draw, text, subtitle, width):
    draw.text((width / 2, 30), text, fill=INK, font=font(28), anchor="mm")
    draw.text((width / 2, 64), subtitle, fill=MUTED, font=font(17), anchor="mm")


def data_parallelism_workflow():
    width, height = 1200, 620
    image = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(image)
    title(draw, "Data parallelism: one whole pipeline per GPU, the prompts split between them",
          "uv run accelerate launch --num_processes 2 data-parallelism-accelerate.py --prompts-file prompts.txt", width)
    box(draw, (40, 250, 250, 370), "prompts 0..9\n(--prompt,\n--prompts-file)", GREY)
    box(draw, (300, 230, 520, 390), "PartialState()\nsplit_between_\nprocesses(prompts)", ORANGE, 17, mono=True)
    arrow(draw, (250, 310), (300, 310))
    for row, (rank, share) in enumerate([(0, "prompts 0-4"), (1, "prompts 5-9")]):
        y = 120 + row * 260
        arrow(draw, (520, 310), (580, y + 80))
        box(draw, (580, y, 880, y + 160), f"process {rank} on xpu:{rank}\n(or cuda:{rank}, or the CPU)\n\n"
            f"whole pipeline copy\n{share}, seeds SEED+i", BLUE, 17)
        arrow(draw, (880, y + 80), (940, y + 80))
        box(draw, (940, y + 25, 1160, y + 135), f"{share.split()[1].split('-')[0]:0>3}-....png ...\n"
            f"+ manifest lines\n(rank {rank})", GREEN, 16)
    draw.text((width / 2, height - 30), "gather_object: the main process collects every process's numbers and "
              "prints the summary; each prompt is made once", fill=MUTED, font=font(16), anchor="mm")
    image.save(ASSETS / "data-parallelism-workflow.png")


def model_parallelism_workflow():
    width, height = 1200, 640
    image = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(image)
    title(draw, "Model sharding: one pipeline spread over the GPUs, one image at a time",
          "uv run model-parallelism-flux.py   (FLUX.1-dev, bf16: 31.7 GiB of weights)", width)
    stages = [("prompt", GREY), ("text encoders\nCLIP-L + T5-XXL\n(9.3 GiB)", PURPLE),
              ("transformer\n57 blocks, 50 steps\n(22.2 GiB)", BLUE), ("VAE decoder\n(0.16 GiB)", GREEN),
              ("flux-dev.png", GREY)]
    for k, (text, fill) in enumerate(stages):
        x = 40 + k * 230
        box(draw, (x, 110, x + 190, 230), text, fill, 16)
        if k:
            arrow(draw, (x - 40, 170), (x, 170))
    draw.text((40, 270), "device_map=\"balanced\" (the pipeline level) puts WHOLE components on devices:",
              fill=INK, font=font(18))
    box(draw, (40, 305, 560, 395), "GPU 0: transformer + VAE (22.4 GiB)", BLUE, 17)
    box(draw, (640, 305, 1160, 395), "GPU 1: T5-XXL + CLIP-L (9.3 GiB)", PURPLE, 17)
    draw.text((40, 430), "when the transformer fits on no single GPU, its blocks are spread (the layer level):",
              fill=INK, font=font(18))
    box(draw, (40, 465, 560, 555), "GPU 0: transformer blocks 0 .. k", BLUE, 17)
    box(draw, (640, 465, 1160, 555), "GPU 1: transformer blocks k+1 .. 56", BLUE, 17)
    arrow(draw, (560, 510), (640, 510))
    draw.text((width / 2, height - 40), "the activations pass from GPU to GPU once per step; the GPUs take turns, "
              "they do not work at the same time", fill=MUTED, font=font(16), anchor="mm")
    image.save(ASSETS / "model-parallelism-workflow.png")


def context_parallelism_workflow():
    """One image, its tokens split between 2 GPUs; in every attention an all-to-all swaps tokens for heads."""
    width, height = 1200, 700
    image = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(image)
    title(draw, "Context parallelism: one image, its tokens split between the GPUs",
          "uv run torchrun --nproc-per-node 2 context-parallelism-flux.py   (FLUX.1-dev, 1024x1024)", width)
    box(draw, (40, 95, 330, 195), "one image's sequence:\n4096 image tokens (64 x 64)\n+ 512 prompt tokens", GREY, 16)
    for rank in (0, 1):
        x = 420 + rank * 390
        if rank == 0:
            arrow(draw, (330, 145), (x, 145))
        else:  # under process 0's boxes, then up
            draw.line([(330, 192), (x + 110, 192)], fill=INK, width=3)
            arrow(draw, (x + 110, 192), (x + 110, 182))
        draw.text((x + 170, 100), f"process {rank} on xpu:{rank} (or cuda:{rank})", fill=INK, font=font(16),
                  anchor="mm")
        box(draw, (x, 120, x + 220, 180), f"image tokens\n{2048 * rank}-{2048 * rank + 2047}", BLUE, 15)
        box(draw, (x + 230, 120, x + 340, 180), f"prompt\n{256 * rank}-{256 * rank + 255}", PURPLE, 15)
    draw.text((40, 225), "every GPU holds the WHOLE transformer; each runs every block on its 2304 tokens. "
              "In each of the 57 blocks' attention:", fill=INK, font=font(17))
    rows = [("Q, K, V of MY 2304 tokens, all 24 heads", ORANGE),
            ("3 all-to-alls (Q, K, V): send heads 12-23 of my tokens, receive heads 0-11 of the other's", GREEN),
            ("attend: ALL 4608 tokens, MY 12 heads (Ulysses)", ORANGE),
            ("all-to-all back: MY 2304 tokens, all 24 heads", GREEN)]
    for k, (text, fill) in enumerate(rows):
        y = 265 + k * 75
        box(draw, (140, y, 1060, y + 55), text, fill, 17)
        if k:
            arrow(draw, (600, y - 20), (600, y))
    arrow(draw, (600, 545), (600, 575))
    box(draw, (60, 575, 1140, 630), "after the last block: all-gather, the whole latent on every GPU; each decodes it, "
        "the main process saves the image", BLUE, 16)
    draw.text((width / 2, height - 30), "ring attention (--ring-degree) passes keys and values round the GPUs instead "
              "of swapping heads; the native attention cannot (no log-sum-exp)", fill=MUTED, font=font(15), anchor="mm")
    image.save(ASSETS / "context-parallelism-workflow.png")


def plan_json(script, *args):
    """A script's --plan --json for the real models' configs in tests/fixtures (no weights, no download)."""
    result = subprocess.run([sys.executable, ROOT / script, "--plan", "--json", *map(str, args)], capture_output=True,
                            text=True, check=True, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return json.loads(result.stdout)


def techniques_side_by_side():
    """The README's picture: every technique of the repository in one image, each as what each GPU holds and what
    passes between the GPUs while they work, for the real models on 2 GPUs (4 for the groups), from the scripts'
    own plans (--plan --json on the configs in tests/fixtures)."""
    flux, sd35, prompts = ROOT / "tests/fixtures/flux1-dev", ROOT / "tests/fixtures/sd3.5-medium", ROOT / "prompts.txt"
    groups = plan_json("data-parallelism-accelerate.py", "--model", flux, "--prompts-file", prompts,
                       "--context-parallel", 2, "--num-devices", 4, "--device-memory", "80GiB")["layout"]
    shares = [(s["ranks"], s["prompts"]) for s in groups["shares"]]
    placed = plan_json("model-parallelism-flux.py", "--model", flux, "--num-devices", 2, "--device-memory",
                       "24GiB")["placement"]
    context = plan_json("context-parallelism-flux.py", "--model", flux, "--num-devices", 2, "--device-memory", "80GiB")
    sharded = plan_json("context-parallelism-flux.py", "--model", flux, "--num-devices", 2, "--device-memory",
                        "16GiB", "--shard-weights", "--staged")
    cfg = plan_json("cfg-parallelism-sd3.py", "--model", sd35, "--device-memory", "24GiB")

    def blocks_on(device):  # FLUX.1-dev's transformer blocks the device map puts on one device, as ranges
        words = []
        for kind, count, label in (("transformer_blocks", 19, "double"), ("single_transformer_blocks", 38, "single")):
            mine = [i for i in range(count) if placed.get(f"transformer.{kind}.{i}", placed.get(
                f"transformer.{kind}")) == device]
            if mine:
                words.append(f"{label} blocks {mine[0]}-{mine[-1]}")
        others = [name.replace("text_encoder_2", "T5").replace("text_encoder", "CLIP").replace("vae", "VAE")
                  for name, where in placed.items() if where == device and "." not in name]
        return ",\n".join(words) + ("\n+ " + ", ".join(others) if others else "")

    half, text_half = context["image_tokens"] // 2, context["text_tokens"] // 2
    gib = 2**30
    transformer, t5 = sharded["sharded"]["transformer"], sharded["sharded"]["text_encoder_2"]
    count = len([line for line in prompts.read_text().splitlines() if line.strip()])
    alone = [share.tolist() for share in torch.arange(count).tensor_split(2)]  # split_between_processes' rule
    panels = [
        ("Data parallelism", "data-parallelism-accelerate.py", "many images",
         [(f"GPU {rank}", f"whole pipeline\nprompts {share[0]}-{share[-1]}") for rank, share in enumerate(alone)],
         "nothing while they work", BLUE, False),
        ("Groups inside data parallelism", "data-parallelism-accelerate.py --context-parallel 2",
         "many images, each one sooner",
         [(f"GPUs {shares[0][0][0]}+{shares[0][0][1]}", f"prompts {shares[0][1][0]}-{shares[0][1][-1]},\n"
           "each image split in 2"),
          (f"GPUs {shares[1][0][0]}+{shares[1][0][1]}", f"prompts {shares[1][1][0]}-{shares[1][1][-1]},\n"
           "each image split in 2")],
         "inside a group: context parallelism's all-to-alls;\nbetween the groups: nothing", BLUE, False),
        ("Model parallelism (device maps)", "model-parallelism-flux.py", "a model too big for one GPU",
         [("GPU 0", blocks_on("0")), ("GPU 1", blocks_on("1"))],
         "the activations, once a step:\nthe GPUs take turns, no faster than one", PURPLE, True),
        ("Sharded weights + context parallelism", "context-parallelism-flux.py --shard-weights",
         "a model too big for one GPU, and faster",
         [(f"GPU {rank}", f"half of every block: {transformer['share'] / gib:.1f} GiB\nhalf of T5: "
           f"{t5['share'] / gib:.1f} GiB\nimage tokens {rank * half}-{rank * half + half - 1}") for rank in (0, 1)],
         f"each block's weights, just before it runs:\n{(transformer['bytes'] - transformer['share']) / gib:.1f} GiB "
         "into each GPU a step; and the all-to-alls", PURPLE, True),
        ("Context parallelism", "context-parallelism-flux.py", "one image sooner (FLUX.1, QwenImage...)",
         [(f"GPU {rank}", f"whole pipeline\nimage tokens {rank * half}-{rank * half + half - 1}\nprompt tokens "
           f"{rank * text_half}-{rank * text_half + text_half - 1}") for rank in (0, 1)],
         f"4 all-to-alls in every attention of {context['heads']} heads\n(query, key, value; the output back)",
         ORANGE, True),
        ("CFG parallelism", "cfg-parallelism-sd3.py", "one image sooner (SD3.5: guidance)",
         [("GPU 0", "whole pipeline\nthe negative prompt's half"), ("GPU 1", "whole pipeline\nthe prompt's half")],
         f"the two halves' predictions:\none all-gather a step ({cfg['exchanged_per_step'] / 2**20:.1f} MiB each way)",
         ORANGE, True),
    ]
    # Columns by what the user wants (many images, one image sooner, a model too big for one GPU); the second row
    # each column's other way.
    panels = [panels[i] for i in (0, 4, 2, 1, 5, 3)]
    cols, panel_w, panel_h = 3, 500, 330
    width, height = cols * panel_w + 40, 110 + 2 * panel_h + 50
    image = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(image)
    title(draw, "Six ways to share a diffusion pipeline's work between GPUs",
          "FLUX.1-dev, SD3.5-medium, 1024x1024: what each GPU holds (the boxes) and what passes between them "
          "while they work", width)
    for k, (name, command, use, gpus, passes, fill, linked) in enumerate(panels):
        x0, y0 = 20 + (k % cols) * panel_w, 100 + (k // cols) * panel_h
        draw.rounded_rectangle((x0 + 6, y0, x0 + panel_w - 6, y0 + panel_h - 14), radius=14, outline=MUTED, width=2)
        draw.text((x0 + panel_w / 2, y0 + 24), name, fill=INK, font=font(20), anchor="mm")
        draw.text((x0 + panel_w / 2, y0 + 50), command, fill=MUTED, font=font(13, mono=True), anchor="mm")
        for g, (label, held) in enumerate(gpus):
            bx = x0 + 20 + g * 246
            draw.text((bx + 107, y0 + 80), label, fill=INK, font=font(16), anchor="mm")
            box(draw, (bx, y0 + 94, bx + 214, y0 + 174), held, fill, 13)
        if linked:  # something passes between the GPUs
            arrow(draw, (x0 + 250, y0 + 134), (x0 + 266, y0 + 134))
            arrow(draw, (x0 + 250, y0 + 134), (x0 + 234, y0 + 134))
        draw.multiline_text((x0 + panel_w / 2, y0 + 226), passes, fill=INK, font=font(15), anchor="mm",
                            align="center", spacing=5)
        draw.text((x0 + panel_w / 2, y0 + 288), f"for: {use}", fill=INK, font=font(16), anchor="mm")
    draw.text((width / 2, height - 26), "drawn by assets/draw_assets.py from the scripts' --plan --json on the "
              "models' configs (tests/fixtures)", fill=MUTED, font=font(14), anchor="mm")
    image.save(ASSETS / "techniques.png")


def model_sharding():
    """Bars per device from the script's own plan of FLUX.1-dev, for three hardware set-ups."""
    plans = []
    for label, num, size, extra in (("2 x 24 GiB", 2, "24GiB", []),
                                    ("23.0 + 23.6 GiB free", 2, "24GiB", ["--max-memory", "0=23GiB,1=23.6GiB"]),
                                    ("4 x 12 GiB", 4, "12GiB", [])):
        result = subprocess.run([sys.executable, ROOT / "model-parallelism-flux.py", "--plan", "--json", "--model",
                                 ROOT / "tests/fixtures/flux1-dev", "--num-devices", str(num), "--device-memory", size,
                                 *extra], capture_output=True, text=True, check=True, cwd=ROOT,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
        plans.append((label, json.loads(result.stdout)))
    width, row_height = 1200, 70
    height = 170 + sum(60 + len(p["devices"]) * row_height for _, p in plans)
    image = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(image)
    title(draw, "Where FLUX.1-dev goes: model-parallelism-flux.py --plan",
          "computed from the real configs on the meta device (no weights); bar length = bytes of weights", width)
    colours = {"transformer": BLUE, "text_encoder_2": PURPLE, "text_encoder": ORANGE, "vae": GREEN}
    legend = {"transformer": "transformer", "text_encoder_2": "T5-XXL (text_encoder_2)",
              "text_encoder": "CLIP-L (text_encoder)", "vae": "VAE"}
    x = 40
    for component, colour in colours.items():
        draw.rounded_rectangle((x, height - 40, x + 24, height - 16), radius=4, fill=colour, outline=INK)
        draw.text((x + 32, height - 28), legend[component], fill=INK, font=font(16), anchor="lm")
        x += 60 + draw.textlength(legend[component], font=font(16))
    y = 100
    for label, plan in plans:
        draw.text((40, y), f"{label}: fits = {plan['fits']}", fill=INK, font=font(20))
        y += 40
        scale = 900 / max(b for _, p in plans for b in p["devices"].values())  # one scale for both set-ups
        for device, total in plan["devices"].items():
            draw.text((40, y + 22), f"device {device}", fill=INK, font=font(17))
            x = 180
            for component, colour in colours.items():
                size = sum(plan.get("bytes", {}).get(m, 0) for m, d in plan["placement"].items()
                           if d == device and (m == component or m.startswith(component + ".")))
                if size:
                    box(draw, (x, y, x + size * scale, y + 55), component if size * scale > 120 else "", colour, 15)
                    x += size * scale
            draw.text((x + 10, y + 22), f"{total / 2**30:.1f} GiB", fill=MUTED, font=font(16))
            y += row_height
        y += 20
    image.save(ASSETS / "model-sharding.png")


def data_parallelism_output():
    """A real 2-process CPU run on the tiny pipeline: the images and who made them."""
    with tempfile.TemporaryDirectory() as tmp:
        model, out = build_sd3(Path(tmp) / "sd3"), Path(tmp) / "out"
        subprocess.run([Path(sys.executable).parent / "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        ROOT / "data-parallelism-accelerate.py", "--model", model, "--output-dir", out,
                        "--prompts-file", ROOT / "prompts.txt", "--num-inference-steps", "4", "--height", "128",
                        "--width", "128"], check=True, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        shutil.copyfile(out / "contact-sheet.png", ASSETS / "data-parallelism-contact-sheet.png")
        records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
        records = [r for r in records if r["rank"] == 0][:4] + [r for r in records if r["rank"] == 1][:4]
        tiles = []
        for r in records:
            tile = Image.new("RGB", (200, 200), PAPER)
            tile.paste(Image.open(out / r["file_name"]), (36, 8))
            draw = ImageDraw.Draw(tile)
            draw.text((100, 152), r["file_name"][:26], fill=INK, font=font(11), anchor="mm")
            draw.text((100, 176), f"rank {r['rank']} on {r['device']}", fill=INK, font=font(14), anchor="mm")
            tiles.append(tile)
    grid = make_image_grid(tiles, rows=2, cols=4)
    image = Image.new("RGB", (grid.width, grid.height + 70), PAPER)
    image.paste(grid, (0, 70))
    draw = ImageDraw.Draw(image)
    draw.text((image.width / 2, 22), "A real run: 2 CPU processes, the tiny random-weight SD3 pipeline",
              fill=INK, font=font(20), anchor="mm")
    draw.text((image.width / 2, 50), "random weights, so the pictures are noise by design; 4 of the 16 "
              "prompts.txt images from each process", fill=MUTED, font=font(14), anchor="mm")
    image.save(ASSETS / "data-parallelism-output.png")


def terminal(text_path, image_path):
    lines = text_path.read_text().splitlines()
    size, pad = 15, 20
    mono = font(size, mono=True)
    width = int(max(draw_width(mono, line) for line in lines)) + 2 * pad
    image = Image.new("RGB", (width, len(lines) * (size + 6) + 2 * pad + 24), "#1e1e1e")
    draw = ImageDraw.Draw(image)
    for k, colour in enumerate(("#ff5f56", "#ffbd2e", "#27c93f")):
        draw.ellipse((pad + 22 * k, 10, pad + 22 * k + 12, 22), fill=colour)
    for k, line in enumerate(lines):
        draw.text((pad, pad + 24 + k * (size + 6)), line, fill="#e6e6e6", font=mono)
    image.save(image_path)


def draw_width(font_, line):
    return font_.getlength(line)


if __name__ == "__main__":
    techniques_side_by_side()
    data_parallelism_workflow()
    model_parallelism_workflow()
    context_parallelism_workflow()
    terminal(ASSETS / "accelerate-config.txt", ASSETS / "accelerate-config.png")
    data_parallelism_output()
    model_sharding()
    print("redrew", ", ".join(sorted(p.name for p in ASSETS.glob("*.png"))))
