"""``python -m relaxedconv.benchmark``: the same as ``relaxedconv bench``."""
import sys

from .runner import main

sys.exit(main())
