"""refine-tta: test-time adaptation (REFINE) for fast-weight language models, served over HTTP.

Tiers, each importing only downward: ``kernels`` -> ``model`` -> ``refine`` -> ``engine``;
``server`` and ``clients`` sit on top. Importing this package is cheap (no fla, no model).
"""

__version__ = "0.1.0"
