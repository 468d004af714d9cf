"""``python -m refine_tta_client``: the same as the ``refine-tta-client`` command."""

import sys

from .cli import main

sys.exit(main())
