"""FLUX.1-dev's architecture with random weights, built directly on the GPU.

Weights cannot be downloaded here, so GPU speed is measured on the real shapes: the cost per step is
the real one, the pictures are noise. Configs are FLUX.1-dev's (transformer 11.9B parameters, T5-XXL
encoder, CLIP-L, the 16-channel FLUX VAE); tokenizers are small local word-level ones.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

PROMPT_WORDS = (
    "a",
    "cat",
    "holding",
    "sign",
    "that",
    "says",
    "hello",
    "world",
    "photo",
    "of",
    "red",
    "blue",
    "lighthouse",
    "at",
    "dusk",
)


def word_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in PROMPT_WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def init_random(module: torch.nn.Module, draw_on: torch.device | None = None) -> torch.nn.Module:
    """normal(0, 0.02) weights, unit norm scales, zero biases: activations stay in a realistic range.

    ``draw_on``: draw the normal values on that device and copy them in (CPU weights filled from a GPU's
    generator, much faster than the CPU's); by default each parameter draws on its own device."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() >= 2 and draw_on is not None:
                drawn = torch.empty(parameter.shape, dtype=parameter.dtype, device=draw_on)
                parameter.copy_(drawn.normal_(0, 0.02))
            elif parameter.dim() >= 2:
                parameter.normal_(0, 0.02)
            elif "norm" in name and name.endswith("weight"):
                parameter.fill_(1.0)
            else:
                parameter.zero_()
    return module


def build_flux1_dev(device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> Any:
    """A FluxPipeline with FLUX.1-dev's component configs and random weights, on ``device``."""
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            transformer = FluxTransformer2DModel(
                attention_head_dim=128,
                guidance_embeds=True,
                in_channels=64,
                joint_attention_dim=4096,
                num_attention_heads=24,
                num_layers=19,
                num_single_layers=38,
                patch_size=1,
                pooled_projection_dim=768,
                axes_dims_rope=(16, 56, 56),
            )
            vae = AutoencoderKL(
                act_fn="silu",
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                in_channels=3,
                out_channels=3,
                latent_channels=16,
                layers_per_block=2,
                norm_num_groups=32,
                sample_size=1024,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                force_upcast=True,
                use_quant_conv=False,
                use_post_quant_conv=False,
                mid_block_add_attention=True,
            )
            clip = CLIPTextModel(
                CLIPTextConfig(
                    hidden_size=768,
                    intermediate_size=3072,
                    num_attention_heads=12,
                    num_hidden_layers=12,
                    max_position_embeddings=77,
                    vocab_size=49408,
                    projection_dim=768,
                    hidden_act="quick_gelu",
                )
            )
            t5 = T5EncoderModel(
                T5Config(
                    d_model=4096,
                    d_ff=10240,
                    d_kv=64,
                    num_heads=64,
                    num_layers=24,
                    vocab_size=32128,
                    feed_forward_proj="gated-gelu",
                    relative_attention_num_buckets=32,
                    relative_attention_max_distance=128,
                )
            )
        finally:
            torch.set_default_dtype(previous)
    modules: tuple[Any, ...] = (transformer, vae, clip, t5)
    for module in modules:
        init_random(module).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=word_tokenizer(77),
        text_encoder_2=t5,
        tokenizer_2=word_tokenizer(512),
        transformer=transformer,
    )
