"""``python -m konsul.cli``: the ``konsul`` command."""

from __future__ import annotations

import sys

from .main import main

sys.exit(main())
