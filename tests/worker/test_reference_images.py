"""Reference images on the worker: read back from storage, checked, and passed to the pipeline."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from PIL import Image

from shared.ids import new_job_id
from shared.jobstore import JobStore
from shared.schemas import GenerationParams, ReferenceImage
from shared.storage import LocalStorage
from tests.support import generation_params
from worker.engine import FluxEngine
from worker.references import ReferenceUnavailable, load_reference_images
from worker.runner import WorkerRuntime, run_job
from worker.types import GenerationOutput, StepCallback


def stored_png(storage: LocalStorage, key: str, color: tuple[int, int, int] = (0, 255, 0)) -> ReferenceImage:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="PNG")
    data = buffer.getvalue()
    storage.put(key, data, "image/png")
    return ReferenceImage(
        key=key, width=64, height=48, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)
    )


def params(references: Sequence[ReferenceImage] = ()) -> GenerationParams:
    return generation_params(model="m", prompt="edit", images=list(references))


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path, "http://h", b"k")


def test_references_load_as_rgb_images_after_their_hash_is_checked(storage: LocalStorage) -> None:
    reference = stored_png(storage, "inputs/j/0.png")
    (image,) = load_reference_images(storage, [reference])
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (64, 48), (0, 255, 0))
    with pytest.raises(ReferenceUnavailable, match="sha256"):
        load_reference_images(storage, [reference.model_copy(update={"sha256": "0" * 64})])
    with pytest.raises(ReferenceUnavailable, match="not in local storage"):
        load_reference_images(storage, [reference.model_copy(update={"key": "inputs/j/9.png"})])


class RecordingEngine:
    def __init__(self) -> None:
        self.references: list[Image.Image] = []

    def generate(
        self, params: GenerationParams, on_step: StepCallback, references: Sequence[Image.Image] = ()
    ) -> GenerationOutput:
        self.references = list(references)
        on_step(params.num_inference_steps, params.num_inference_steps)
        return GenerationOutput(images=[Image.new("RGB", (params.width, params.height))])


def test_run_job_hands_the_references_to_the_engine(storage: LocalStorage, redis_client: redis.Redis) -> None:
    engine = RecordingEngine()
    runtime = WorkerRuntime(JobStore(redis_client), storage, engine, "w1", max_attempts=3)
    job_id = new_job_id()
    refs = [stored_png(storage, f"inputs/{job_id}/{i}.png", (i, 0, 0)) for i in range(2)]
    runtime.store.create(job_id, "alice", params(refs))
    assert run_job(job_id, 1, runtime) == "succeeded"
    assert [image.getpixel((0, 0)) for image in engine.references] == [(0, 0, 0), (1, 0, 0)]


def test_a_missing_reference_fails_the_job_with_its_own_code(
    storage: LocalStorage, redis_client: redis.Redis
) -> None:
    runtime = WorkerRuntime(JobStore(redis_client), storage, RecordingEngine(), "w1", max_attempts=3)
    reference = stored_png(storage, "inputs/x/0.png").model_copy(update={"key": "inputs/x/gone.png"})
    job_id = runtime.store.create(new_job_id(), "alice", params([reference])).id
    assert run_job(job_id, 1, runtime) == "failed"
    record = runtime.store.get(job_id)
    assert record is not None and record.error is not None
    assert record.error.code == "reference_unavailable" and "gone.png" in record.error.message


def _engine(class_name: str) -> FluxEngine:
    pipeline: Any = type(class_name, (), {})()
    return FluxEngine(pipeline, torch.device("cpu"))


def test_kontext_gets_one_image_and_flux2_a_list() -> None:
    one, two = Image.new("RGB", (64, 64)), Image.new("RGB", (80, 64))
    kontext = _engine("FluxKontextPipeline")._call_arguments(params(), lambda s, t: None, [one])
    assert kontext["image"] is one and kontext["max_area"] == 64 * 64
    flux2 = _engine("Flux2Pipeline")._call_arguments(params(), lambda s, t: None, [one, two])
    assert flux2["image"] == [one, two]
    assert "image" not in _engine("Flux2Pipeline")._call_arguments(params(), lambda s, t: None)
    with pytest.raises(ValueError, match="one reference image"):
        _engine("FluxKontextPipeline")._call_arguments(params(), lambda s, t: None, [one, two])
    with pytest.raises(ValueError, match="does not take reference images"):
        _engine("FluxPipeline")._call_arguments(params(), lambda s, t: None, [one])


@pytest.mark.parametrize("size", [(90, 70), (1100, 1000)])
def test_flux2_reference_tokens_are_the_tokens_its_pipeline_appends(size: tuple[int, int]) -> None:
    """Exact counts keep an even sequence split (and compile) for FLUX.2 edits in a worker group."""
    from worker.engine import flux2_reference_tokens
    from worker.tiny_flux2 import build_tiny_flux2_pipeline

    pipe: Any = build_tiny_flux2_pipeline()
    lengths: list[int] = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    engine = FluxEngine(pipe, torch.device("cpu"))
    reference = Image.new("RGB", size, (10, 200, 30))
    engine.generate(
        generation_params(model="m", prompt="edit", width=64, height=32, num_inference_steps=1),
        lambda step, total: None,
        references=[reference],
    )
    assert lengths == [4 * 2 + flux2_reference_tokens(reference)]
    assert (
        engine._image_tokens(generation_params(model="m", prompt="edit", width=64, height=32), [reference])
        == lengths[0]
    )


@pytest.mark.parametrize("size", [(90, 70), (300, 1000)])
def test_kontext_reference_tokens_are_the_tokens_its_pipeline_appends(size: tuple[int, int]) -> None:
    """Kontext resizes its reference to the preferred resolution nearest its aspect ratio; an exact
    count keeps a group's even split (and compile) for Kontext edits whose tokens divide."""
    from worker.engine import kontext_reference_tokens
    from worker.tiny_model import build_tiny_pipeline

    pipe: Any = build_tiny_pipeline("kontext", seed=0)
    lengths: list[int] = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    engine = FluxEngine(pipe, torch.device("cpu"))
    reference = Image.new("RGB", size, (10, 200, 30))
    job = generation_params(model="m", prompt="edit", width=64, height=32, num_inference_steps=1)
    engine.generate(job, lambda step, total: None, references=[reference])
    assert lengths == [4 * 2 + kontext_reference_tokens(reference)]
    assert engine._image_tokens(job, [reference]) == lengths[0]
    assert kontext_reference_tokens(Image.new("RGB", (8, 64))) == -1
