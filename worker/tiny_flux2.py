"""A tiny random-weight FLUX.2-dev pipeline (``diffusers.Flux2Pipeline``), built entirely on this machine.

``worker.tiny_model`` dispatches its ``"flux2"`` kind here; see that module for why tiny models exist. The
components are FLUX.2-dev's classes with tiny widths:

* **VAE** (``AutoencoderKLFlux2``): four blocks (8x spatial downsampling) and 32 latent channels, as in the
  real model, plus the ``bn`` BatchNorm whose running statistics the pipeline uses to (de)normalize the
  2x2-patchified 128-channel latents. A W x H job therefore gives the real number of image tokens,
  ``(W/16) * (H/16)``, and the transformer takes ``in_channels=128``.
* **Text encoder** (``Mistral3ForConditionalGeneration``): 31 decoder layers of width 16. The pipeline
  stacks ``hidden_states[10, 20, 30]`` by default (``text_encoder_out_layers``); 31 layers keep all three
  intermediate (pre-final-norm) outputs, as with the 40-layer Mistral Small 3.1, so callers need not pass
  anything. The transformer's ``joint_attention_dim`` is therefore ``3 * 16 = 48``.
* **Tokenizer**: a ``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5) over a byte-level
  BPE, with Mistral's special tokens at Mistral's ids and a Mistral-style chat template. The real checkpoint
  ships a ``PixtralProcessor``, but in transformers 5 that class requires torchvision, which the worker does
  not install; the pipeline's prompt encoding only calls ``tokenizer.apply_chat_template(...)``, which the
  plain tokenizer provides. Every byte is in the vocabulary, so no prompt is ever out of vocabulary.
* **Transformer** (``Flux2Transformer2DModel``): one double block and one single block, two heads of 16.
* **Scheduler**: ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's config (the pipeline passes its own
  resolution- and step-dependent ``mu``, which needs ``use_dynamic_shifting``).

Not supported: caption upsampling (``caption_upsample_temperature``), which needs the processor's
``.tokenizer`` attribute and image handling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and diffusers are imported lazily: importing this module must stay cheap.
    from diffusers import DiffusionPipeline

TEXT_HIDDEN = 16  # Mistral hidden size; the pipeline concatenates three layers -> joint_attention_dim 48.
TEXT_LAYERS = 31  # hidden_states[30] must exist and be an intermediate layer for the default (10, 20, 30).
DEFAULT_OUT_LAYERS = (10, 20, 30)
JOINT_ATTENTION_DIM = TEXT_HIDDEN * len(DEFAULT_OUT_LAYERS)
LATENT_CHANNELS = 32

# The first ids of Mistral Small 3.1's tokenizer (Tekken), so that bos/eos/pad/[IMG] ids match the real model.
_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)  # fmt: skip
_BOS, _EOS, _IMG, _PAD = 1, 2, 10, 11

# Words that get whole-word tokens (with and without a leading space); everything else falls back to bytes.
_COMMON_WORDS = (
    "a", "an", "the", "of", "and", "with", "in", "on", "at", "photo", "portrait", "painting", "cat", "dog",
    "red", "blue", "green", "light", "sky", "city", "night", "style", "high", "quality", "image", "you",
)  # fmt: skip

# Mistral-style: [SYSTEM_PROMPT]..[/SYSTEM_PROMPT], [INST]..[/INST], assistant turns end with </s>.
# Message content is a string or a list of {"type": "text"|"image", ...} parts (as Flux2Pipeline sends).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' }}{%- endif %}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- elif part['type'] == 'image' %}{{- '[IMG]' }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[/INST]' }}"
    "{%- else %}{{- eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def _tokenizer() -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with Mistral's special tokens and a chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {token: index for index, token in enumerate(_SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in (*_COMMON_WORDS, *("Ġ" + word for word in _COMMON_WORDS)):  # "Ġ" is the byte-level space.
        pieces = list(word)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in _SPECIAL_TOKENS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=131072,
    )


def _text_encoder(vocab_size: int) -> Any:
    """A 31-layer, width-16 ``Mistral3ForConditionalGeneration`` with a one-layer Pixtral vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text_config = {
        "model_type": "mistral",
        "vocab_size": vocab_size,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 32,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": TEXT_HIDDEN // 2,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000000.0},
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": _BOS,
        "eos_token_id": _EOS,
        "pad_token_id": _PAD,
    }
    vision_config = {
        "model_type": "pixtral",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 64,
        "patch_size": 8,
        "num_channels": 3,
    }
    config = Mistral3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=_IMG,
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )
    return Mistral3ForConditionalGeneration(config).eval()


def _vae() -> Any:
    """An ``AutoencoderKLFlux2`` with FLUX.2's geometry: four blocks (8x) and 32 latent channels.

    As in the FLUX.1 tiny VAE, the mid-block self-attention is left out (its cost grows with the square of
    the latent area). The ``bn`` running statistics get seeded, non-trivial values so that the pipeline's
    latent (de)normalization is exercised.
    """
    import torch
    from diffusers import AutoencoderKLFlux2

    vae: Any = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=False,
        batch_norm_eps=1e-4,
    )
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(torch.empty_like(vae.bn.running_var).uniform_(0.5, 1.5))
    return vae.eval()


def _transformer() -> Any:
    """A one-double-block, one-single-block ``Flux2Transformer2DModel`` taking 128 patchified channels."""
    from diffusers import Flux2Transformer2DModel

    transformer: Any = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=JOINT_ATTENTION_DIM,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True,
    )
    return transformer.eval()


def build_tiny_flux2_pipeline(seed: int = 0) -> DiffusionPipeline:
    """Build the tiny random-weight ``Flux2Pipeline`` (float32, CPU); weights are a function of ``seed``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    from worker.tiny_model import DEV_SCHEDULER_CONFIG

    tokenizer = _tokenizer()
    # Seed before each component so that each one's weights depend only on `seed`, not on build order.
    torch.manual_seed(seed)
    text_encoder = _text_encoder(len(tokenizer))
    torch.manual_seed(seed + 2)
    vae = _vae()
    torch.manual_seed(seed + 3)
    transformer = _transformer()
    pipeline: Any = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return pipeline
