"""REFINE at test time: selection, rollouts, rewards, advantages, loss, the adaptation loop.

Tier 2 of refine-tta (looks down on ``refine_tta.model`` and ``refine_tta.kernels`` only).
``config`` is plain Python (no torch); ``objective`` holds the pure tensor functions of the
objective. This package imports nothing on import: import the submodule you need.
"""
