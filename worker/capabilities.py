"""What each FLUX pipeline class can do, checked against the model's configured capabilities at start."""

from __future__ import annotations

from shared.settings import ModelCapabilities

# Pipeline class -> (can edit, max reference images, negative prompt via true CFG).
PIPELINE_FEATURES: dict[str, tuple[bool, int, bool]] = {
    "FluxPipeline": (False, 0, True),
    "FluxKontextPipeline": (True, 1, True),
    "Flux2Pipeline": (True, 10, False),
}


class CapabilityMismatch(Exception):
    """The configuration claims something the loaded pipeline cannot do."""


def check_capabilities(pipeline_class: str, model_name: str, claimed: ModelCapabilities) -> None:
    """Refuse to serve a model whose configuration promises more than its pipeline supports."""
    if pipeline_class not in PIPELINE_FEATURES:
        supported = ", ".join(PIPELINE_FEATURES)
        raise CapabilityMismatch(f"model {model_name!r}: pipeline {pipeline_class} is not one of {supported}")
    can_edit, max_references, negative_prompt = PIPELINE_FEATURES[pipeline_class]
    problems = []
    if claimed.edit and not can_edit:
        problems.append("edit")
    if claimed.max_reference_images > max_references:
        problems.append(f"max_reference_images={claimed.max_reference_images} (at most {max_references})")
    if claimed.negative_prompt and not negative_prompt:
        problems.append("negative_prompt")
    if problems:
        raise CapabilityMismatch(
            f"model {model_name!r} is configured with {', '.join(problems)}, "
            f"which {pipeline_class} does not support"
        )
