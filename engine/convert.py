"""Export an SD-family diffusers folder as one `.safetensors` in the original (LDM / A1111) key layout.

A1111, ComfyUI and diffusers' `from_single_file` read this layout. The mapping is
driven by the UNet and VAE configs, so it covers SD1.5 and the starter models alike.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _rename(key: str, prefix_map: list[tuple[str, str]]) -> str:
    for diffusers_prefix, ldm_prefix in prefix_map:
        if key.startswith(diffusers_prefix):
            return ldm_prefix + key[len(diffusers_prefix):]
    raise KeyError(f"no LDM name for {key}")


def unet_ldm_names(keys: list[str], config: dict) -> dict[str, str]:
    """UNet2DConditionModel weight names -> their `model.diffusion_model.*` names (SD1.5 and the starter layouts)."""
    layers = config["layers_per_block"]
    prefixes: list[tuple[str, str]] = [
        ("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
        ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i in range(len(config["block_out_channels"])):
        for j in range(layers):
            block = 1 + i * (layers + 1) + j
            prefixes += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0."),
                         (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.")]
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op."))
        up_has_attention = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(layers + 1):
            block = i * (layers + 1) + j
            prefixes += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0."),
                         (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.")]
        last = i * (layers + 1) + layers
        prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{last}.{2 if up_has_attention else 1}."))
    names = {}
    for key in keys:
        new = _rename(key, prefixes)
        if ".resnets." in key or key.startswith("mid_block.resnets"):
            for diffusers_name, ldm_name in _RESNET:
                new = new.replace(f".{diffusers_name}.", f".{ldm_name}.")
        names[key] = "model.diffusion_model." + new
    return names


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights -> `model.diffusion_model.*`."""
    names = unet_ldm_names(list(state), config)
    return {names[key]: value for key, value in state.items()}


def vae_ldm_names(keys: list[str], config: dict) -> dict[str, str]:
    """AutoencoderKL weight names -> their `first_stage_model.*` names."""
    blocks = len(config["block_out_channels"])
    prefixes: list[tuple[str, str]] = [
        ("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out."),
        ("encoder.mid_block.attentions.0.", "encoder.mid.attn_1."), ("decoder.mid_block.attentions.0.", "decoder.mid.attn_1."),
    ]
    for side in ("encoder", "decoder"):
        prefixes += [(f"{side}.mid_block.resnets.{j}.", f"{side}.mid.block_{j + 1}.") for j in range(2)]
        prefixes += [(f"{side}.conv_in.", f"{side}.conv_in."), (f"{side}.conv_out.", f"{side}.conv_out.")]
    for i in range(blocks):
        prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        prefixes.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample."))
        prefixes.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{blocks - 1 - i}.block."))
    prefixes += [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    attention_names = [(".group_norm.", ".norm."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
                       (".to_out.0.", ".proj_out.")]
    names = {}
    for key in keys:
        new = _rename(key, prefixes).replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new:
            for diffusers_name, ldm_name in attention_names:
                new = new.replace(diffusers_name, ldm_name)
        names[key] = "first_stage_model." + new
    return names


def vae_ldm_value(ldm_name: str, value: torch.Tensor) -> torch.Tensor:
    """The LDM layout keeps the VAE's attention projections as 1x1 convolutions."""
    if ".mid.attn_1." in ldm_name and ldm_name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) \
            and value.ndim == 2:
        return value.reshape(*value.shape, 1, 1)
    return value


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights -> `first_stage_model.*` (attention weights become 1x1 convolutions)."""
    names = vae_ldm_names(list(state), config)
    return {names[key]: vae_ldm_value(names[key], value) for key, value in state.items()}


def text_encoder_ldm_name(key: str) -> str:
    """A CLIP text encoder weight name -> its `cond_stage_model.transformer.*` name (SD1.5 layout)."""
    # Real SD1.5 files name CLIP weights `...transformer.text_model.*`; transformers 5 drops that level.
    return "cond_stage_model.transformer." + (key if key.startswith("text_model.") else "text_model." + key)


def export_ldm_checkpoint(pipe, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write `pipe` (a StableDiffusionPipeline) as one LDM-layout `.safetensors` file."""
    tensors: dict[str, torch.Tensor] = {}
    tensors.update(unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)))
    tensors.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    for key, value in pipe.text_encoder.state_dict().items():
        tensors[text_encoder_ldm_name(key)] = value
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}, str(out))
    return out
