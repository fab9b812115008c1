"""FLUX.2's tiny autoencoder (``fal/FLUX.2-Tiny-AutoEncoder``) as a ``Flux2Pipeline.vae``.

The fal checkpoint is remote code: ``Flux2TinyAutoEncoder(ModelMixin, ConfigMixin)`` wraps an
``AutoencoderTiny(latent_channels=32)`` (8x) with an extra stride-2 conv (32 -> 128 channels, 16x) and
residual blocks. Its ``encode(x).latent`` is the 128-channel latent at H/16 and ``decode(z).sample`` maps it
back to pixels. ``Flux2Pipeline`` cannot use it as it is: the pipeline reads ``vae.bn`` (running statistics),
``vae.config.batch_norm_eps`` and ``vae.config.block_out_channels``, and it hands ``vae.decode`` the
*un-patchified* 32-channel latent at H/8 (and expects the same layout back from ``vae.encode``).
``Flux2TinyVaeAdapter`` supplies that interface; ``load_flux2_tiny_vae`` loads and wraps the checkpoint;
``is_flux2_tiny_autoencoder`` tells such a checkpoint apart from a plain diffusers VAE by its ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook

FLUX2_TINY_CLASS_NAME = "Flux2TinyAutoEncoder"
PATCH = 2  # FLUX.2 patchifies the 32-channel /8 latent 2x2 into the 128-channel /16 latent.
_DEFAULT_TINY_LATENT_CHANNELS = 128
_DEFAULT_TINY_BLOCKS = (64, 64, 64, 64)


@dataclass(frozen=True)
class PointLatentDistribution:
    """A deterministic stand-in for ``DiagonalGaussianDistribution``: the tiny encoder has no variance.

    ``Flux2Pipeline`` calls ``latent_dist.mode()`` (``sample_mode="argmax"``); ``sample`` returns the same
    tensor so that any caller that samples gets the encoder's output too.
    """

    mean: torch.Tensor

    def mode(self) -> torch.Tensor:
        """The latent (the distribution's only point)."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The latent; ``generator`` is accepted for interface compatibility and unused."""
        return self.mean


class Flux2TinyVaeAdapter(ModelMixin, ConfigMixin):  # type: ignore[misc]  # their config_name types differ
    """A loaded ``Flux2TinyAutoEncoder`` behind the interface ``Flux2Pipeline`` expects of its ``vae``.

    **Layout.** The pipeline decodes by de-normalizing the transformer's 128-channel /16 latent with ``bn``,
    un-patchifying it to 32 channels at /8 (``Flux2Pipeline._unpatchify_latents``) and calling ``decode``.
    ``decode`` undoes that un-patchify with ``F.pixel_unshuffle(z, 2)`` (the same channel order,
    ``c * 4 + dy * 2 + dx``, so exactly its inverse) and calls ``tiny.decode`` on the 128-channel /16 latent.
    ``encode`` returns ``F.pixel_shuffle(tiny.encode(x).latent, 2)``, which the pipeline's
    ``_patchify_latents`` turns back into ``tiny.encode(x).latent`` exactly. Images are in [-1, 1] both ways,
    as for the real VAE (``AutoencoderTiny`` maps to and from its own [0, 1] internally).

    **Normalization (assumed, not verified).** By default ``bn`` is the identity: running mean 0, running
    variance 1 and ``batch_norm_eps`` 0, so the pipeline's ``latents * sqrt(var + eps) + mean`` and
    ``(latents - mean) / sqrt(var + eps)`` change nothing. The tiny autoencoder then works directly in the
    transformer's (BN-normalized) latent space: ``tiny.decode`` receives the latent the transformer produced
    and ``tiny.encode`` must produce latents the transformer accepts as reference tokens. This is what
    SGLang's ``Flux2FinetunedPipelineConfig`` does for this checkpoint (no scale or shift), and the
    convention of the comparable TAEF2 tiny decoder. It is *not* what every integration assumes: SGLang's
    generic FLUX.2 config scales bn-less VAEs by their ``scaling_factor`` (``0.13025`` in the fal config,
    which ``AutoencoderTiny`` itself never applies), and some training code treats the tiny encoder's output
    as the *raw* FLUX.2 VAE latent (normalized with the real VAE's ``bn``). Each hypothesis is a choice of
    ``running_mean`` / ``running_var`` / ``batch_norm_eps`` here: the real VAE's ``bn`` statistics and eps
    for "raw", or ``running_var = 0.13025 ** 2`` for "scaled". **Which one the fal weights need must be
    checked on real weights**: decode one denoised FLUX.2 latent with ``AutoencoderKLFlux2`` and with this
    adapter and compare the images (and round-trip an image through ``encode``/``decode``); it cannot be
    checked here.

    The adapter does not support ``save_pretrained``/``from_pretrained`` of itself (its config does not
    describe the wrapped model), tiling or slicing; build it with ``load_flux2_tiny_vae``.
    """

    tiny: Any  # the wrapped Flux2TinyAutoEncoder (remote code, so untyped)

    def __init__(
        self,
        tiny: torch.nn.Module,
        running_mean: torch.Tensor | None = None,
        running_var: torch.Tensor | None = None,
        batch_norm_eps: float = 0.0,
    ) -> None:
        super().__init__()
        _check_tiny_interface(tiny)
        tiny_latent_channels = _tiny_latent_channels(tiny)
        self.tiny = tiny
        self.register_to_config(
            in_channels=3,
            out_channels=3,
            latent_channels=tiny_latent_channels // PATCH**2,
            block_out_channels=_tiny_block_out_channels(tiny),
            batch_norm_eps=float(batch_norm_eps),
            patch_size=(PATCH, PATCH),
            force_upcast=False,
            tiny_latent_channels=tiny_latent_channels,
        )
        self.bn = torch.nn.BatchNorm2d(
            tiny_latent_channels, eps=float(batch_norm_eps), affine=False, track_running_stats=True
        )
        _set_running_stats(self.bn, running_mean, running_var)
        self.eval()

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[Any, ...]:
        """Images in [-1, 1], ``(B, 3, H, W)`` -> latent ``(B, 32, H/8, W/8)`` in ``latent_dist.mode()``."""
        distribution = PointLatentDistribution(self._encode_latent(x))
        if not return_dict:
            return (distribution,)
        return AutoencoderKLOutput(latent_dist=distribution)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """De-normalized, un-patchified latent ``(B, 32, H/8, W/8)`` -> images in [-1, 1] ``(B, 3, H, W)``."""
        image = self._decode_image(z)
        if not return_dict:
            return (image,)
        return DecoderOutput(sample=image)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """Round trip (encode, then decode), like ``AutoencoderKL.forward`` without sampling."""
        return self._decode_image(self._encode_latent(sample))

    def _encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """``tiny.encode(x).latent`` (128 channels, /16), pixel-shuffled to 32 channels at /8."""
        packed = _output_tensor(self.tiny.encode(x.to(self.dtype)), ("latent", "latents"))
        return F.pixel_shuffle(packed, PATCH)

    def _decode_image(self, z: torch.Tensor) -> torch.Tensor:
        """``tiny.decode`` of ``z`` pixel-unshuffled back to 128 channels at /16."""
        packed = F.pixel_unshuffle(z.to(self.dtype), PATCH)
        return _output_tensor(self.tiny.decode(packed), ("sample",))


def _check_tiny_interface(tiny: torch.nn.Module) -> None:
    """The wrapped model must have ``encode`` and ``decode`` methods; raises ``TypeError`` otherwise."""
    for name in ("encode", "decode"):
        if not callable(getattr(tiny, name, None)):
            raise TypeError(f"{type(tiny).__name__} has no {name}() method: not a FLUX.2 tiny autoencoder")


def _tiny_config(tiny: torch.nn.Module) -> Any:
    return getattr(tiny, "config", None)


def _tiny_latent_channels(tiny: torch.nn.Module) -> int:
    """The tiny model's (patchified) latent channels, 128 for FLUX.2; must be divisible by 4."""
    channels = int(getattr(_tiny_config(tiny), "latent_channels", _DEFAULT_TINY_LATENT_CHANNELS))
    if channels % PATCH**2:
        raise ValueError(f"tiny autoencoder latent_channels={channels} is not divisible by {PATCH**2}")
    return channels


def _tiny_block_out_channels(tiny: torch.nn.Module) -> tuple[int, ...]:
    """Encoder block widths; their count sets ``vae_scale_factor = 2 ** (n - 1)`` (8 for four blocks).

    ``AutoencoderTiny`` halves the resolution in every encoder block but the first, so four blocks give /8;
    the extra stride-2 conv gives the tiny model's /16, which ``encode``'s pixel shuffle turns back into /8.
    """
    blocks = getattr(_tiny_config(tiny), "encoder_block_out_channels", None) or _DEFAULT_TINY_BLOCKS
    return tuple(int(width) for width in blocks)


def _set_running_stats(
    bn: torch.nn.BatchNorm2d, running_mean: torch.Tensor | None, running_var: torch.Tensor | None
) -> None:
    """Copy the given statistics into ``bn``; left out, they stay BatchNorm's defaults (mean 0, var 1)."""
    with torch.no_grad():
        for buffer, value in ((bn.running_mean, running_mean), (bn.running_var, running_var)):
            if value is not None and buffer is not None:
                buffer.copy_(torch.as_tensor(value).reshape(buffer.shape))


def _output_tensor(output: Any, names: tuple[str, ...]) -> torch.Tensor:
    """The tensor in a model output: the first of ``names`` present, a tuple's first item, or the tensor."""
    if isinstance(output, torch.Tensor):
        return output
    for name in names:
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a tensor ({', '.join(names)}) in {type(output).__name__}")


def load_flux2_tiny_vae(path: str, dtype: torch.dtype) -> Flux2TinyVaeAdapter:
    """Load a ``Flux2TinyAutoEncoder`` checkpoint (hub id or directory, remote code) and wrap it.

    This runs the checkpoint's own python file (``trust_remote_code=True``); the caller decides whether that
    source is trusted. Errors from ``AutoModel.from_pretrained`` (``OSError``, ``ValueError``, ...) propagate.
    """
    from diffusers import AutoModel

    tiny = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    adapter = Flux2TinyVaeAdapter(tiny)
    adapter.bn.to(dtype=dtype)  # the tiny model already has `dtype`; the new BatchNorm buffers follow it
    return adapter


def is_flux2_tiny_autoencoder(path: str) -> bool:
    """Whether ``path`` (a directory, or a hub id already in the local cache) holds a FLUX.2 tiny autoencoder.

    Reads ``config.json``: its ``_class_name`` is ``Flux2TinyAutoEncoder``, or its ``auto_map`` points at a
    class of that name. A hub id is looked up only in the local Hugging Face cache (never downloaded); an
    uncached id, a missing or unreadable config, or anything else gives ``False``.
    """
    config_file = _local_config_file(path)
    if config_file is None:
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return _names_flux2_tiny(config)


def _local_config_file(path: str) -> Path | None:
    """``config.json`` of a directory, or of a hub id from the local cache; ``None`` if there is none."""
    directory = Path(path)
    if directory.is_dir():
        config_file = directory / "config.json"
        return config_file if config_file.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(path, "config.json", local_files_only=True))
    except Exception:  # not a valid repo id, not cached, hub library missing or failing: not a tiny AE
        return None


def _names_flux2_tiny(config: Any) -> bool:
    """Whether a parsed ``config.json`` names the ``Flux2TinyAutoEncoder`` class."""
    if not isinstance(config, dict):
        return False
    if config.get("_class_name") == FLUX2_TINY_CLASS_NAME:
        return True
    auto_map = config.get("auto_map")
    references = auto_map.values() if isinstance(auto_map, dict) else ()
    return any(isinstance(ref, str) and ref.split(".")[-1] == FLUX2_TINY_CLASS_NAME for ref in references)
