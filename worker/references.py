"""Reference images on the worker: read back from storage, where the gateway stored them checked.

The gateway fetched, validated and normalized every reference image (RGB PNG) before the job was
written, so a worker needs no outbound network access: it reads each by key and checks the sha256
the job recorded.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import Protocol

from PIL import Image

from shared.schemas import GenerationParams, ReferenceImage
from shared.storage import Storage, StorageError
from worker.types import GenerationOutput, StepCallback


class ReferenceUnavailable(Exception):
    """A reference image is missing from storage, unreadable, or not the one the job recorded."""


class EditingEngine(Protocol):
    """An engine that takes reference images (``worker.engine.FluxEngine``)."""

    def generate(
        self, params: GenerationParams, on_step: StepCallback, references: Sequence[Image.Image] = ()
    ) -> GenerationOutput: ...


def load_reference_images(storage: Storage, references: Sequence[ReferenceImage]) -> list[Image.Image]:
    """Each stored reference as a decoded RGB image; raises ReferenceUnavailable naming the key."""
    images = []
    for reference in references:
        try:
            data = storage.get(reference.key)
        except StorageError as error:
            raise ReferenceUnavailable(str(error)) from error
        if hashlib.sha256(data).hexdigest() != reference.sha256:
            raise ReferenceUnavailable(f"{reference.key} does not match the sha256 the job recorded")
        try:
            with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise ReferenceUnavailable(f"{reference.key} could not be decoded: {error}") from error
    return images
