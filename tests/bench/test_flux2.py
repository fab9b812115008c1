"""The FLUX.2 full-size benchmark's pieces, checked on the CPU: the meta-built text encoder's random
fill, and the benchmark itself on the tiny FLUX.2 (``--smoke``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bench import flux2
from bench.random_flux2 import MISTRAL_SMALL_TEXT, PIXTRAL_VISION, random_on_cpu


def small_mistral(device: str) -> Any:
    """Mistral Small's config with every width and depth cut down, built on ``device``."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = {
        **MISTRAL_SMALL_TEXT,
        **dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2),
        **dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    }
    vision = {
        **PIXTRAL_VISION,
        **dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        **dict(head_dim=8, image_size=28),
    }
    with torch.device(device):
        return Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision))


def test_a_meta_built_text_encoder_gets_random_weights_and_its_real_rotary_frequencies() -> None:
    built = small_mistral("cpu")
    encoder = random_on_cpu(small_mistral("meta"), torch.device("cpu"))
    buffers = dict(built.named_buffers())
    for name, buffer in encoder.named_buffers():
        assert buffer.device.type == "cpu"
        assert torch.equal(buffer, buffers[name]), name
    weights = dict(encoder.named_parameters())
    up_projection = weights["model.language_model.layers.0.mlp.up_proj.weight"].detach()
    assert abs(float(up_projection.std()) - 0.02) < 0.005
    assert torch.all(weights["model.language_model.norm.weight"] == 1.0)
    out = encoder(input_ids=torch.tensor([[1, 5, 9]]), output_hidden_states=True).hidden_states[-1]
    assert torch.isfinite(out).all()


def test_the_flux2_benchmark_times_each_reference_count_and_saves_comparable_images(tmp_path: Path) -> None:
    report_file = tmp_path / "one.json"
    common = ["--smoke", "--res", "64", "--steps", "2", "--reference-size", "64", "--repeats", "1"]
    assert flux2.main([*common, "--references", "0,1", "--tag", "one", "--image-dir", str(tmp_path),
                       "--output-file", str(report_file)]) == 0  # fmt: skip
    report = json.loads(report_file.read_text())
    for count in (0, 1):
        result = report[f"refs{count}"]
        assert len(result["seconds"]) == 1 and result["median_s"] > 0
        assert set(result["stages_s"][0]) == {"text_encoder", "vae_decode"}
        assert result["stages_s"][0]["text_encoder"] > 0
    same = flux2.compare([str(tmp_path / "one_refs0.png")] * 2)
    assert same == {"psnr_db": float("inf"), "max_abs_difference": 0}
    edited = flux2.compare([str(tmp_path / "one_refs0.png"), str(tmp_path / "one_refs1.png")])
    assert edited["max_abs_difference"] > 0  # the reference image changes the picture
