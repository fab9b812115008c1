"""Tests for worker.optimizations.flux2_tiny_vae: FLUX.2's tiny autoencoder as a Flux2Pipeline VAE.

The real ``fal/FLUX.2-Tiny-AutoEncoder`` (remote code plus weights) cannot be downloaded here, so a stand-in
with the same architecture and the same interface is defined below under the same class name:
``AutoencoderTiny(latent_channels=32)`` plus a stride-2 ``Conv2d(32 -> 128, k4)`` with a residual block on
the way in and a ``ConvTranspose2d(128 -> 32, k4)`` with a residual block on the way out; ``encode(x).latent``
is 128 channels at H/16 and ``decode(z).sample`` is the image. Its widths and depths are tiny and its weights
random, so these tests check shapes, layout and plumbing, never image quality or the latent normalization
the real weights expect.
"""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import huggingface_hub.constants
import pytest
import torch
from diffusers import AutoencoderTiny, DiffusionPipeline, Flux2Pipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, dynamic_modules_utils
from PIL import Image
from torch import nn

from tests.support import generation_params
from worker.optimizations.flux2_tiny_vae import (
    Flux2TinyVaeAdapter,
    is_flux2_tiny_autoencoder,
    load_flux2_tiny_vae,
)
from worker.optimizations.vae import check_vae_fits
from worker.tiny_model import build_tiny_pipeline, save_tiny_model

SIZE = 64  # Flux2Pipeline rejects reference images under 64 px a side.


@dataclass
class Flux2TinyAutoEncoderOutput(BaseOutput):
    """What the stand-in's ``encode`` returns: the 128-channel latent at H/16."""

    latent: torch.Tensor


class Flux2TinyAutoEncoder(ModelMixin, ConfigMixin):  # type: ignore[misc]  # their config_name types differ
    """Stand-in for fal's remote-code class: same architecture and interface, tiny default widths."""

    tiny_vae: Any

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 128,
        encoder_block_out_channels: tuple[int, ...] = (8, 8, 8, 8),
        decoder_block_out_channels: tuple[int, ...] = (8, 8, 8, 8),
        act_fn: str = "silu",
        upsampling_scaling_factor: int = 2,
        num_encoder_blocks: tuple[int, ...] = (1, 1, 1, 1),
        num_decoder_blocks: tuple[int, ...] = (1, 1, 1, 1),
        latent_magnitude: float = 3.0,
        latent_shift: float = 0.5,
        force_upcast: bool = False,
        scaling_factor: float = 0.13025,
    ) -> None:
        super().__init__()
        inner = latent_channels // 4
        self.tiny_vae = AutoencoderTiny(
            in_channels=in_channels,
            out_channels=out_channels,
            encoder_block_out_channels=tuple(encoder_block_out_channels),
            decoder_block_out_channels=tuple(decoder_block_out_channels),
            act_fn=act_fn,
            latent_channels=inner,
            upsampling_scaling_factor=upsampling_scaling_factor,
            num_encoder_blocks=tuple(num_encoder_blocks),
            num_decoder_blocks=tuple(num_decoder_blocks),
            latent_magnitude=latent_magnitude,
            latent_shift=latent_shift,
            force_upcast=force_upcast,
            scaling_factor=scaling_factor,
        )
        self.extra_encoder = nn.Conv2d(inner, latent_channels, kernel_size=4, stride=2, padding=1)
        self.extra_decoder = nn.ConvTranspose2d(latent_channels, inner, kernel_size=4, stride=2, padding=1)
        self.residual_encoder = nn.Sequential(
            nn.Conv2d(latent_channels, latent_channels, kernel_size=3, padding=1),
            nn.GroupNorm(8, latent_channels),
            nn.SiLU(),
            nn.Conv2d(latent_channels, latent_channels, kernel_size=3, padding=1),
        )
        self.residual_decoder = nn.Sequential(
            nn.Conv2d(inner, inner, kernel_size=3, padding=1),
            nn.GroupNorm(8, inner),
            nn.SiLU(),
            nn.Conv2d(inner, inner, kernel_size=3, padding=1),
        )

    def encode(self, x: torch.Tensor) -> Flux2TinyAutoEncoderOutput:
        compressed = self.extra_encoder(self.tiny_vae.encode(x, return_dict=False)[0])
        return Flux2TinyAutoEncoderOutput(latent=self.residual_encoder(compressed) + compressed)

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        expanded = self.extra_decoder(z)
        expanded = self.residual_decoder(expanded) + expanded
        return DecoderOutput(sample=self.tiny_vae.decode(expanded, return_dict=False)[0])


_REMOTE_CODE_HEADER = """from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderTiny
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
"""


def _tiny(seed: int = 0) -> Flux2TinyAutoEncoder:
    torch.manual_seed(seed)
    return Flux2TinyAutoEncoder().eval()


def _images(batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Random images in [-1, 1], as Flux2Pipeline's image processor hands them to the VAE."""
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _save_remote_code_checkpoint(directory: Path, tiny: Flux2TinyAutoEncoder) -> Path:
    """Save ``tiny`` like the fal repo: weights, config.json with ``auto_map`` and the class's python file."""
    tiny.save_pretrained(directory)
    source = "\n\n".join(inspect.getsource(cls) for cls in (Flux2TinyAutoEncoderOutput, Flux2TinyAutoEncoder))
    (directory / "flux2_tiny_autoencoder.py").write_text(f"{_REMOTE_CODE_HEADER}\n\n{source}")
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoModel": "flux2_tiny_autoencoder.Flux2TinyAutoEncoder"}
    config_file.write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def tiny() -> Flux2TinyAutoEncoder:
    return _tiny()


@pytest.fixture(scope="module")
def adapter(tiny: Flux2TinyAutoEncoder) -> Flux2TinyVaeAdapter:
    return Flux2TinyVaeAdapter(tiny)


@pytest.fixture(scope="module")
def pipe(adapter: Flux2TinyVaeAdapter) -> Any:
    """The tiny FLUX.2 pipeline with the adapter as its VAE (built anew so vae_scale_factor is its own)."""
    base: Any = build_tiny_pipeline("flux2")
    pipeline: Any = Flux2Pipeline(**{**base.components, "vae": adapter})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _running_stats(adapter: Flux2TinyVaeAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = adapter.bn.running_mean, adapter.bn.running_var
    assert mean is not None and var is not None
    return mean, var


def _generate(pipe: Any, **kwargs: Any) -> Any:
    options = {"height": SIZE, "width": SIZE, "num_inference_steps": 2}
    options.update(kwargs)
    return pipe(prompt="a photo of a cat", generator=torch.Generator().manual_seed(1), **options).images[0]


def test_adapter_exposes_what_flux2_pipeline_reads(adapter: Flux2TinyVaeAdapter, pipe: Any) -> None:
    assert adapter.config["latent_channels"] == 32
    assert adapter.config["block_out_channels"] == (8, 8, 8, 8)  # the tiny encoder's widths: four blocks
    assert pipe.vae_scale_factor == 8
    assert adapter.config["batch_norm_eps"] == 0.0
    assert adapter.bn.num_features == 128
    mean, var = _running_stats(adapter)
    assert torch.equal(mean, torch.zeros(128))
    assert torch.equal(var, torch.ones(128))
    assert adapter.dtype == torch.float32
    assert not adapter.training


def test_decode_feeds_the_pipelines_unpatchified_latent_to_tiny_decode_unchanged(
    adapter: Flux2TinyVaeAdapter, tiny: Flux2TinyAutoEncoder
) -> None:
    packed = torch.randn(2, 128, SIZE // 16, SIZE // 16, generator=torch.Generator().manual_seed(3))
    unpatchified = Flux2Pipeline._unpatchify_latents(packed)  # what Flux2Pipeline passes to vae.decode
    assert unpatchified.shape == (2, 32, SIZE // 8, SIZE // 8)
    with torch.no_grad():
        image = adapter.decode(unpatchified).sample
        (as_tuple,) = adapter.decode(unpatchified, return_dict=False)
        expected = tiny.decode(packed).sample
    assert image.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(image, expected)
    assert torch.equal(as_tuple, expected)


def test_encode_gives_the_pipeline_a_latent_it_patchifies_back_to_the_tiny_latent(
    adapter: Flux2TinyVaeAdapter, tiny: Flux2TinyAutoEncoder
) -> None:
    images = _images(batch=2)
    with torch.no_grad():
        distribution = adapter.encode(images).latent_dist
        (as_tuple,) = adapter.encode(images, return_dict=False)
        expected = tiny.encode(images).latent
    latent = distribution.mode()
    assert expected.shape == (2, 128, SIZE // 16, SIZE // 16)
    assert latent.shape == (2, 32, SIZE // 8, SIZE // 8)
    assert torch.equal(Flux2Pipeline._patchify_latents(latent), expected)
    assert torch.equal(distribution.sample(torch.Generator()), latent)  # deterministic encoder
    assert torch.equal(as_tuple.mode(), latent)


def test_identity_normalization_hands_the_tiny_latent_to_the_transformer(
    pipe: Any, tiny: Flux2TinyAutoEncoder
) -> None:
    images = _images()
    with torch.no_grad():
        normalized = pipe._encode_vae_image(images, generator=torch.Generator())
        expected = tiny.encode(images).latent
    assert torch.equal(normalized, expected)


def test_given_running_stats_are_the_ones_the_pipeline_uses(tiny: Flux2TinyAutoEncoder) -> None:
    mean, var = torch.linspace(-1, 1, 128), torch.linspace(0.5, 2, 128)
    custom = Flux2TinyVaeAdapter(tiny, running_mean=mean, running_var=var, batch_norm_eps=1e-4)
    assert all(torch.equal(got, want) for got, want in zip(_running_stats(custom), (mean, var), strict=True))
    assert custom.config["batch_norm_eps"] == 1e-4


def test_generates_a_64px_image(pipe: Any) -> None:
    image = _generate(pipe)
    assert isinstance(image, Image.Image)
    assert image.size == (SIZE, SIZE)


def test_edit_with_a_reference_image_encodes_it_with_the_tiny_encoder(
    pipe: Any, tiny: Flux2TinyAutoEncoder
) -> None:
    reference = Image.new("RGB", (SIZE, SIZE))
    with mock.patch.object(tiny, "encode", wraps=tiny.encode) as encode:
        image = _generate(pipe, image=[reference])
    assert encode.call_count == 1
    assert encode.call_args.args[0].shape == (1, 3, SIZE, SIZE)
    assert image.size == (SIZE, SIZE)


def test_diffusion_pipeline_from_pretrained_accepts_the_adapter_as_vae(
    tmp_path: Path, adapter: Flux2TinyVaeAdapter
) -> None:
    """The engine's path: ``DiffusionPipeline.from_pretrained(model, vae=...)``, then ``check_vae_fits``."""
    saved = save_tiny_model(tmp_path / "flux2", "flux2")
    pipeline: Any = DiffusionPipeline.from_pretrained(saved, vae=adapter)
    assert pipeline.vae is adapter
    check_vae_fits(pipeline, "tiny-vae")
    assert type(pipeline) is Flux2Pipeline  # last: mypy narrows `pipeline` after this


def test_adapter_rejects_a_model_without_encode_and_decode() -> None:
    with pytest.raises(TypeError, match=r"no encode\(\)"):
        Flux2TinyVaeAdapter(nn.Conv2d(1, 1, 1))


@pytest.fixture
def offline_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep remote-code loading inside tmp_path (its module cache and sys.path) and off the network."""
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.usefixtures("offline_modules")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_flux2_tiny_vae_loads_the_remote_code_checkpoint_and_wraps_it(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    tiny = _tiny(seed=5)
    directory = _save_remote_code_checkpoint(tmp_path / "tiny", tiny)
    loaded = load_flux2_tiny_vae(str(directory), dtype)
    assert isinstance(loaded, Flux2TinyVaeAdapter)
    assert type(loaded.tiny).__name__ == "Flux2TinyAutoEncoder"
    assert type(loaded.tiny) is not Flux2TinyAutoEncoder  # the checkpoint's own python file ran
    assert loaded.dtype == dtype
    assert loaded.bn.running_var is not None
    assert loaded.bn.running_var.dtype == dtype
    expected = tiny.state_dict()
    assert all(torch.equal(value, expected[key].to(dtype)) for key, value in loaded.tiny.state_dict().items())
    latent = torch.randn(1, 32, SIZE // 8, SIZE // 8)
    with torch.no_grad():
        image = loaded.decode(latent).sample
    assert image.shape == (1, 3, SIZE, SIZE)
    assert image.dtype == dtype


def test_is_flux2_tiny_autoencoder_recognizes_a_saved_checkpoint(tmp_path: Path) -> None:
    _tiny().save_pretrained(tmp_path / "by-class-name")  # _class_name: Flux2TinyAutoEncoder
    assert is_flux2_tiny_autoencoder(str(tmp_path / "by-class-name"))
    by_auto_map = tmp_path / "by-auto-map"
    by_auto_map.mkdir()
    auto_map = {"AutoModel": "flux2_tiny_autoencoder.Flux2TinyAutoEncoder"}
    (by_auto_map / "config.json").write_text(json.dumps({"auto_map": auto_map}))
    assert is_flux2_tiny_autoencoder(str(by_auto_map))


def test_is_flux2_tiny_autoencoder_is_false_for_other_vaes_and_bad_paths(tmp_path: Path) -> None:
    taef1_like: Any = AutoencoderTiny(latent_channels=16)
    taef1_like.save_pretrained(tmp_path / "taef1-like")
    flux2: Any = build_tiny_pipeline("flux2")
    flux2.vae.save_pretrained(tmp_path / "flux2-vae")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad-json").mkdir()
    (tmp_path / "bad-json" / "config.json").write_text("{not json")
    (tmp_path / "list-json").mkdir()
    (tmp_path / "list-json" / "config.json").write_text("[]")
    for name in ("taef1-like", "flux2-vae", "empty", "bad-json", "list-json", "missing"):
        assert not is_flux2_tiny_autoencoder(str(tmp_path / name)), name


def _cache_hub_config(cache: Path, repo_id: str, config: dict[str, Any]) -> None:
    """Lay out ``config.json`` of ``repo_id`` in a Hugging Face cache as a download would."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))


def test_is_flux2_tiny_autoencoder_reads_hub_ids_from_the_local_cache_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    _cache_hub_config(cache, "fal/FLUX.2-Tiny-AutoEncoder", {"_class_name": "Flux2TinyAutoEncoder"})
    _cache_hub_config(cache, "madebyollin/taef1", {"_class_name": "AutoencoderTiny"})
    assert is_flux2_tiny_autoencoder("fal/FLUX.2-Tiny-AutoEncoder")
    assert not is_flux2_tiny_autoencoder("madebyollin/taef1")
    assert not is_flux2_tiny_autoencoder("someone/not-in-the-cache")
    assert not is_flux2_tiny_autoencoder("not a valid // repo id")


@pytest.mark.usefixtures("offline_modules")
def test_engine_vae_path_serves_flux2_with_the_tiny_autoencoder_only_when_trusted(tmp_path: Path) -> None:
    from worker.engine import FluxEngine
    from worker.optimizations.vae import VaeError
    from worker.options import EngineOptions
    from worker.tiny_model import save_tiny_model

    model = save_tiny_model(tmp_path / "flux2", kind="flux2")
    vae_dir = str(_save_remote_code_checkpoint(tmp_path / "taef2", _tiny(seed=1)))
    with pytest.raises(VaeError, match="--vae-trust-remote-code"):
        FluxEngine.load(str(model), EngineOptions(device="cpu", vae_path=vae_dir))
    engine = FluxEngine.load(
        str(model), EngineOptions(device="cpu", vae_path=vae_dir, vae_trust_remote_code=True)
    )
    assert isinstance(engine.pipeline.vae, Flux2TinyVaeAdapter)
    params = generation_params(model="m", prompt="a kite")
    assert engine.generate(params, lambda step, total: None).images[0].size == (64, 64)
