"""`python -m mlx_spec.bench`."""

import sys

from .command import main

sys.exit(main())
