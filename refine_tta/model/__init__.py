"""Tier 1: loading fla models and LaCT, their kernel backend, document states, reading and generation.

Importing this package does not import fla (that happens in ``load_model``).
"""

from refine_tta.model.decoding import (
    BatchDecoder,
    DecodeResult,
    TokenEvent,
    TokenSampling,
    generate_tokens,
    sample_next,
    sample_rows,
)
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
from refine_tta.model.state import CacheAdapter, DocumentState, LayerState, NamedLayerState, cache_adapter

__all__ = [
    "SUPPORTED_MODEL_TYPES", "BatchDecoder", "CacheAdapter", "DecodeResult", "DocumentState", "LayerState",
    "LoadedModel", "ModelFingerprint", "ModelLoadError", "NamedLayerState", "ReadOutput", "TokenEvent", "TokenSampling",
    "cache_adapter", "fingerprint_model", "generate_tokens", "load_model", "prepare_model", "read", "read_document",
    "sample_next", "sample_rows",
]
