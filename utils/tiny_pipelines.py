"""Build tiny, random-weight Stable Diffusion 3, FLUX.1 and QwenImage pipelines, offline, in seconds.

They have the real pipelines' classes, folder layout (`model_index.json`, one sub-folder per component) and
shape rules (an 8x VAE, sizes in multiples of 16), but a few hundred kilobytes of random weights instead of
16-34 GB of trained ones. Their pictures are noise; what they are for is trying the scripts, and testing them,
on any machine without a download:

    uv run utils/tiny_pipelines.py tiny                # writes tiny/sd3, tiny/flux and tiny/qwenimage
    uv run accelerate launch --multi_gpu --num_processes 2 data-parallelism-accelerate.py --model tiny/sd3 --device cpu

The tokenizers are built in code from a small vocabulary (every byte for CLIP and Qwen, letters and digits for
T5), so nothing is fetched from the Hugging Face Hub.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

TEXT_DIM = 32  # hidden size of every tiny text encoder


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters byte-level BPE (CLIP, GPT-2) uses for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every byte is a token, so any text (unicode too) tokenizes."""
    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = _bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(specials + chars + [c + "</w>" for c in chars])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """A T5 (SentencePiece unigram) tokenizer over letters, digits and punctuation; anything else is <unk>."""
    pieces = list(string.ascii_letters + string.digits + string.punctuation)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(p, -5.0) for p in pieces] + [("▁" + p, -4.0) for p in pieces]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    return T5Tokenizer(vocab=vocab, extra_ids=100, model_max_length=512)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 (byte-level BPE) tokenizer with no merges, every byte a token, and the special tokens of
    QwenImagePipeline's prompt template (<|im_start|>, <|im_end|>; <|endoftext|> pads)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(_bytes_to_unicode() + specials)}
    return Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=specials[1:], model_max_length=2048)


def _clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        projection_dim=TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def _t5(tokenizer: T5Tokenizer) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _vae(latent_channels: int, **kwargs) -> AutoencoderKL:
    # Four blocks, as in the real VAEs: an 8x down-sampling, so sizes follow the real models' rules.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8],
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        **kwargs,
    )


def build_sd3(out: Path, num_layers: int = 2, attention_head_dim: int = 8) -> Path:
    """A tiny StableDiffusion3Pipeline (the class of stabilityai/stable-diffusion-3.5-medium).

    More layers or a wider attention head make it slower, for benchmarks that must be compute-bound."""
    torch.manual_seed(0)
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=8,  # default size: 8 latents x 8 = 64 px
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=4,
            joint_attention_dim=TEXT_DIM,
            caption_projection_dim=4 * attention_head_dim,
            pooled_projection_dim=2 * TEXT_DIM,
            pos_embed_max_size=64,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(_clip_config(clip)),
        tokenizer=clip,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(clip)),
        tokenizer_2=clip,
        text_encoder_3=_t5(t5),
        tokenizer_3=t5,
    )
    pipe.save_pretrained(out)
    return out


def build_flux(out: Path) -> Path:
    """A tiny FluxPipeline (the class of black-forest-labs/FLUX.1-dev)."""
    torch.manual_seed(0)
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels, packed 2x2
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=TEXT_DIM,
            axes_dims_rope=[4, 4, 8],
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModel(_clip_config(clip)),
        tokenizer=clip,
        text_encoder_2=_t5(t5),
        tokenizer_2=t5,
    )
    pipe.save_pretrained(out)
    return out


def build_qwenimage(out: Path) -> Path:
    """A tiny QwenImagePipeline (the class of Qwen/Qwen-Image). Its transformer has 3 attention heads, which 2
    processes do not divide (context parallelism pads them: ulysses_anything)."""
    torch.manual_seed(0)
    tokenizer = qwen_tokenizer()
    ids = {"bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
           "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"hidden_size": TEXT_DIM, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, **ids},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": TEXT_DIM},
        vocab_size=len(tokenizer),
        # no images in a text-to-image prompt: ids that no token has
        image_token_id=len(tokenizer), video_token_id=len(tokenizer) + 1, vision_start_token_id=len(tokenizer) + 2,
        vision_end_token_id=len(tokenizer) + 3, **ids,
    ))
    pipe = QwenImagePipeline(
        transformer=QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,  # 4 latent channels, packed 2x2
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=3,
            joint_attention_dim=TEXT_DIM,
            axes_dims_rope=(4, 6, 6),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        # Three spatial down-samplings, as in the real VAE: 8x, and sizes in multiples of 16 (2x2 packing).
        vae=AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                   temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                   latents_std=[1.0] * 4),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.save_pretrained(out)
    return out


BUILDERS = {"sd3": build_sd3, "flux": build_flux, "qwenimage": build_qwenimage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write the pipelines into (one sub-folder each)")
    parser.add_argument(
        "--kind", choices=sorted(BUILDERS), action="append", help="which pipeline to build (default: all)"
    )
    args = parser.parse_args()
    for kind in args.kind or sorted(BUILDERS):
        path = BUILDERS[kind](args.out / kind)
        print(f"wrote a tiny random-weight {kind} pipeline to {path}  (try: --model {path})")


if __name__ == "__main__":
    main()
