"""Pure-PyTorch kernels: the CPU path for everything fla runs through Triton.

Tier 0 of refine-tta: tensor math only, no model, no fla import. Each function has an
fla counterpart that it is tested against (``tests/test_kernels.py``); LaCT's math
(``refine_tta.kernels.lact``, which fla does not have) is tested against its whole-sequence
reference form (``tests/test_lact.py``).
"""

from refine_tta.kernels.delta_rule import delta_rule, delta_rule_chunked, delta_rule_recurrent, l2norm
from refine_tta.kernels.layers import causal_conv1d, gated_rms_norm, rms_norm, swiglu_mlp

__all__ = [
    "causal_conv1d",
    "delta_rule",
    "delta_rule_chunked",
    "delta_rule_recurrent",
    "gated_rms_norm",
    "l2norm",
    "rms_norm",
    "swiglu_mlp",
]
