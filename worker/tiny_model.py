"""Tiny random-weight FLUX.1 and FLUX.2 pipelines, built entirely on this machine.

Why this exists:

* **No downloads.** Tests and CI have no access to the Hugging Face Hub, and the real FLUX.1 weights are
  tens of gigabytes. Every component here (transformer, VAE, both text encoders, both tokenizers,
  scheduler) is constructed from a config in code, seeded, and written with ``save_pretrained``. The
  resulting directory loads with ``diffusers.DiffusionPipeline.from_pretrained(directory)`` through exactly
  the same code path as a real checkpoint, so the worker's loading and generation code is exercised for real.
* **Same classes, same shapes where they matter.** The pipeline classes (``FluxPipeline`` /
  ``FluxKontextPipeline``), model classes and scheduler config match FLUX.1-dev / -schnell / -Kontext. The
  VAE keeps FLUX's 8x spatial downsampling and 16 latent channels, so the transformer takes
  ``in_channels=64`` (16 channels x 2x2 packing) and a W x H job produces the same number of image tokens
  (``(W/16) * (H/16)``) as the real model; only the widths and depths are tiny.
* **FLUX.2 too.** The ``"flux2"`` kind is a FLUX.2-dev-like ``Flux2Pipeline`` (32 latent channels at /8,
  ``in_channels=128``, a Mistral3 text encoder); it is built in ``worker.tiny_flux2``, which documents it.
* **Deterministic and small.** Torch is seeded before each component, so the same ``seed`` gives the same
  weights; a saved model is well under 1 MB and builds in well under a second.

The tokenizers are real ``transformers`` tokenizer classes (``CLIPTokenizer`` and ``T5Tokenizer``, both
backed by the ``tokenizers`` library) over a small vocabulary: byte-level BPE for CLIP (every byte is in
the vocabulary, so nothing is ever unknown) and a Unigram model over printable ASCII for T5 (anything else
maps to ``<unk>``).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and diffusers are imported lazily: importing this module must stay cheap.
    from diffusers import DiffusionPipeline

TINY_KINDS = ("flux1", "schnell", "kontext", "flux2")

# FLUX.1-dev's scheduler_config.json (FLUX.1-Kontext-dev ships the same one).
DEV_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
# FLUX.1-schnell's scheduler_config.json: no resolution-dependent shift.
SCHNELL_SCHEDULER_CONFIG: dict[str, Any] = {
    **DEV_SCHEDULER_CONFIG,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}

TEXT_DIM = 32  # CLIP hidden size == pooled_projection_dim; T5 d_model == joint_attention_dim.
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

# A few common prompt words get whole-word tokens; everything else falls back to characters / bytes.
_COMMON_WORDS = (
    "a", "an", "the", "of", "and", "with", "in", "on", "at", "photo", "portrait", "painting", "cat", "dog",
    "red", "blue", "green", "light", "sky", "city", "night", "style", "high", "quality",
)  # fmt: skip


def _clip_tokenizer() -> Any:
    """A byte-level BPE ``CLIPTokenizer``: all 256 byte symbols (and ``</w>`` forms) plus a few merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _COMMON_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    # Like the real CLIP vocabulary, the special tokens come last (end-of-text has the highest id).
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # The tokenizers-backed BPE wants merges as (left, right) tuples; the type hint only admits strings.
    merge_pairs: Any = merges
    return CLIPTokenizer(vocab=vocab, merges=merge_pairs, model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer() -> Any:
    """A Unigram ``T5Tokenizer`` over printable ASCII and a few whole words; anything else is ``<unk>``."""
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + word, -3.0) for word in _COMMON_WORDS]
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab += [(char, -5.0) for char in chars]
    vocab += [("▁" + char, -5.5) for char in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _clip_text_encoder(tokenizer: Any) -> Any:
    """A 2-layer ``CLIPTextModel`` whose special-token ids match ``tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        projection_dim=TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _t5_text_encoder(tokenizer: Any) -> Any:
    """A 1-layer ``T5EncoderModel`` with ``d_model`` equal to the transformer's ``joint_attention_dim``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_DIM,
        d_kv=16,
        d_ff=37,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def _vae() -> Any:
    """An ``AutoencoderKL`` with FLUX's geometry: four blocks (8x downsampling) and 16 latent channels.

    The mid-block self-attention is left out: its cost grows with the square of the latent area (16k
    positions at 1024x1024, 65k at 2048x2048) while it tests nothing the worker cares about.
    """
    from diffusers import AutoencoderKL

    vae: Any = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    return vae.eval()


def _transformer(guidance_embeds: bool) -> Any:
    """A one-double-block, one-single-block ``FluxTransformer2DModel`` taking FLUX's 64 packed channels."""
    from diffusers import FluxTransformer2DModel

    transformer: Any = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    return transformer.eval()


def _check_kind(kind: str) -> None:
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {', '.join(TINY_KINDS)}")


def build_tiny_pipeline(kind: str = "flux1", seed: int = 0) -> DiffusionPipeline:
    """Build a tiny random-weight FLUX pipeline in memory (float32, CPU).

    ``kind`` is ``"flux1"`` (FLUX.1-dev-like ``FluxPipeline``), ``"schnell"`` (``FluxPipeline`` without
    guidance embedding and with schnell's fixed-shift scheduler), ``"kontext"`` (``FluxKontextPipeline``) or
    ``"flux2"`` (FLUX.2-dev-like ``Flux2Pipeline``, see ``worker.tiny_flux2``). The weights are a
    deterministic function of ``seed``. Raises ``ValueError`` for an unknown ``kind``.
    """
    _check_kind(kind)
    if kind == "flux2":
        from worker.tiny_flux2 import build_tiny_flux2_pipeline

        return build_tiny_flux2_pipeline(seed)
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    # Seed before each component so that each one's weights depend only on `seed`, not on build order.
    torch.manual_seed(seed)
    text_encoder = _clip_text_encoder(tokenizer)
    torch.manual_seed(seed + 1)
    text_encoder_2 = _t5_text_encoder(tokenizer_2)
    torch.manual_seed(seed + 2)
    vae = _vae()
    torch.manual_seed(seed + 3)
    transformer = _transformer(guidance_embeds=kind != "schnell")
    config = SCHNELL_SCHEDULER_CONFIG if kind == "schnell" else DEV_SCHEDULER_CONFIG
    pipeline_class: Any = FluxKontextPipeline if kind == "kontext" else FluxPipeline
    return pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(**config),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def save_tiny_model(directory: str | Path, kind: str = "flux1", seed: int = 0) -> Path:
    """Build a tiny FLUX pipeline of ``kind`` and ``save_pretrained`` it into ``directory``.

    The directory then loads with ``diffusers.DiffusionPipeline.from_pretrained(directory)`` like a real
    checkpoint. Returns the directory as a ``Path``. Raises ``ValueError`` naming ``kind`` if it is unknown.
    """
    _check_kind(kind)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    pipeline: Any = build_tiny_pipeline(kind, seed)
    pipeline.save_pretrained(path)
    return path
