"""FLUX.2-dev at full size with random weights: transformer on the GPU, text encoder where asked.

Weights cannot be downloaded here, so speed and memory are measured on the real shapes (the pictures
are noise). Configs are FLUX.2-dev's: ``Flux2Transformer2DModel()``'s defaults (32.2B parameters,
64.5 GB in bf16), Mistral Small 3.1/3.2's 24B ``Mistral3ForConditionalGeneration`` (40 decoder
layers of width 5120, 32 query and 8 key/value heads, MLP 32768, vocabulary 131072, a 24-layer
Pixtral vision tower; 48 GB in bf16), and ``AutoencoderKLFlux2()``'s defaults. The tokenizer is the
tiny FLUX.2 one (``worker.tiny_flux2``): prompts are padded to 512 tokens either way, so the encoder's
cost is the real one.

The transformer is built directly on its GPU, as the stock script in ``../shared/gpu`` builds it.
The text encoder cannot be: beside the transformer it would not fit an 80 GB card. It is built on
the meta device, given uninitialised CPU memory and filled from the GPU's random generator one
tensor at a time (48 GB of CPU init would take minutes); the engine then places it (offloaded, or
sharded over a worker group one weight at a time). Every rank that seeds alike draws the same weights.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.random_flux import init_random

MISTRAL_SMALL_TEXT = {
    "model_type": "mistral",
    "vocab_size": 131072,
    "hidden_size": 5120,
    "intermediate_size": 32768,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000000.0},
    "sliding_window": None,
    "tie_word_embeddings": False,
}
PIXTRAL_VISION = {
    "model_type": "pixtral",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "head_dim": 64,
    "image_size": 1540,
    "patch_size": 14,
    "num_channels": 3,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}


def mistral_small_config() -> Any:
    from transformers import Mistral3Config

    return Mistral3Config(
        text_config=MISTRAL_SMALL_TEXT,
        vision_config=PIXTRAL_VISION,
        image_token_index=10,
        spatial_merge_size=2,
        multimodal_projector_bias=False,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def random_on_cpu(module: torch.nn.Module, generator_device: torch.device) -> torch.nn.Module:
    """Give a meta-built module CPU memory and random weights drawn on ``generator_device``.

    ``init_random``'s rule, drawn on ``generator_device``. The rotary embeddings' frequency buffers are
    computed at construction, which the meta device skipped: they are rebuilt from each module's config.
    """
    module.to_empty(device="cpu")
    init_random(module, draw_on=generator_device)
    with torch.no_grad():
        for rotary in [child for child in module.modules() if hasattr(child, "inv_freq")]:
            fresh = type(rotary)(rotary.config)
            for buffer_name, buffer in fresh.named_buffers(recurse=False):
                getattr(rotary, buffer_name).copy_(buffer)
    return module


def build_flux2_dev(
    device: str = "cuda", text_encoder_on_cpu: bool = True, dtype: torch.dtype = torch.bfloat16
) -> Any:
    """A ``Flux2Pipeline`` with FLUX.2-dev's component configs and random weights.

    The transformer and the VAE are built on ``device``; the Mistral text encoder on the CPU (the
    engine places it) unless ``text_encoder_on_cpu`` is False.
    """
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Mistral3ForConditionalGeneration

    from worker.tiny_flux2 import _tokenizer
    from worker.tiny_model import DEV_SCHEDULER_CONFIG

    generator_device = torch.device(device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer: Any = Flux2Transformer2DModel()
            vae: Any = AutoencoderKLFlux2()
        with torch.device("meta"):
            text_encoder: Any = Mistral3ForConditionalGeneration(mistral_small_config())
    finally:
        torch.set_default_dtype(previous)
    init_random(transformer).eval()
    init_random(vae).eval()
    random_on_cpu(text_encoder, generator_device).eval()
    if not text_encoder_on_cpu:
        text_encoder.to(device)
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(),
        transformer=transformer,
    )
