"""Tiny random-weight SDXL and FLUX pipelines built from config, as diffusers' own tests build them.

They exercise the real SDXL and FLUX code paths of the engine on CPU in well under a second.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
    StableDiffusionXLPipeline, UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedTokenizerFast, T5Config,
    T5EncoderModel,
)

from engine.training.tokenizer_files import write_tokenizer

WORDS = ["a", "red", "blue", "circle", "cat", "on", "background", "square", "the", "dog"]


def _clip_tokenizer(folder: Path) -> CLIPTokenizer:
    write_tokenizer(folder, WORDS, 77)
    return CLIPTokenizer.from_pretrained(folder)


def _clip(config_vocab: int, tokenizer: CLIPTokenizer, projection: bool, hidden: int = 32):
    config = CLIPTextConfig(vocab_size=config_vocab, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(latent_channels: int = 4) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=32, sample_size=64)


def build_tiny_sdxl(folder: Path) -> Path:
    """Save a tiny random SDXL pipeline into `folder`."""
    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(folder / "_tok")
    vocab = len(tokenizer)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), unet=unet, text_encoder=_clip(vocab, tokenizer, False), text_encoder_2=_clip(vocab, tokenizer, True),
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1),
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_flux(folder: Path) -> Path:
    """Save a tiny random FLUX pipeline into `folder`."""
    torch.manual_seed(0)
    clip_tokenizer = _clip_tokenizer(folder / "_tok")
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + WORDS)}
    t5_backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t5_backend.pre_tokenizer = pre_tokenizers.Whitespace()
    t5_tokenizer = PreTrainedTokenizerFast(tokenizer_object=t5_backend, pad_token="<pad>", eos_token="</s>",
                                           unk_token="<unk>", model_max_length=64)
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_clip(len(clip_tokenizer), clip_tokenizer, False),
        tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def registry_file(folder: Path, entries: list[dict]) -> Path:
    """Write a models.toml for `entries` into `folder`."""
    lines = [f'default = "{entries[0]["name"]}"']
    for entry in entries:
        lines.append("[[models]]")
        for key, value in entry.items():
            if isinstance(value, dict):
                continue
            lines.append(f"{key} = {json.dumps(value)}")
        if "defaults" in entry:
            lines.append("[models.defaults]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in entry["defaults"].items()]
    path = folder / "models.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
