"""LaCT (large-chunk test-time training) in Hugging Face format, pure PyTorch, with a carried state.

``register_lact()`` makes transformers' Auto classes know ``model_type = "lact_swiglu"`` (called
by ``load_model``; nothing is registered at import).
"""

from refine_tta.model.lact.configuration import LaCTSWIGLUConfig
from refine_tta.model.lact.modeling import LaCTForCausalLM, LaCTModel, state_nbytes
from refine_tta.model.lact.state import LaCTCache, LaCTCacheAdapter


def register_lact() -> None:
    """Register LaCT's config and models with transformers' Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if LaCTSWIGLUConfig.model_type in CONFIG_MAPPING:
        return
    AutoConfig.register(LaCTSWIGLUConfig.model_type, LaCTSWIGLUConfig)
    AutoModel.register(LaCTSWIGLUConfig, LaCTModel)
    AutoModelForCausalLM.register(LaCTSWIGLUConfig, LaCTForCausalLM)


__all__ = ["LaCTCache", "LaCTCacheAdapter", "LaCTForCausalLM", "LaCTModel", "LaCTSWIGLUConfig", "register_lact",
           "state_nbytes"]
