"""`python -m worker` is `fraud-worker`."""

import sys

from .cli import main

sys.exit(main())
