"""``python -m bntriton ...``: the same as the ``bntriton`` console script."""
import sys

from .cli import main

sys.exit(main())
