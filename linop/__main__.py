"""``python -m linop``: the command line (:mod:`linop.cli`)."""
import sys

from .cli import main

sys.exit(main())
