"""`python -m mlx_spec.server`."""

import sys

from .command import main

sys.exit(main())
