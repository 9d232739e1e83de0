"""``python -m bmrs_pyro ...`` is the ``bmrs`` command (what ``torchrun -m bmrs_pyro run ...`` starts)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
