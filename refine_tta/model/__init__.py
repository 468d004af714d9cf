"""Tier 1: loading fla models, their kernel backend, document states, reading and generation.

Importing this package does not import fla (that happens in ``load_model``).
"""

from refine_tta.model.generation import GenerationResult, SamplingConfig, generate, sample_next
from refine_tta.model.loading import (
    SUPPORTED_MODEL_TYPES,
    LoadedModel,
    ModelFingerprint,
    ModelLoadError,
    fingerprint_model,
    load_model,
    prepare_model,
)
from refine_tta.model.runtime import ReadOutput, read, read_document
from refine_tta.model.state import DocumentState, LayerState

__all__ = [
    "SUPPORTED_MODEL_TYPES", "DocumentState", "GenerationResult", "LayerState", "LoadedModel", "ModelFingerprint",
    "ModelLoadError", "ReadOutput", "SamplingConfig", "fingerprint_model", "generate", "load_model",
    "prepare_model", "read", "read_document", "sample_next",
]
