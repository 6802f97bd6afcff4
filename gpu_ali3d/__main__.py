"""``python -m gpu_ali3d ...``: the same as the ``gpu-ali3d`` command."""
import sys

from .cli import main

sys.exit(main())
