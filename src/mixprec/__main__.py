"""`python -m mixprec` runs the `mixprec` command."""

import sys

from .cli import main

sys.exit(main())
