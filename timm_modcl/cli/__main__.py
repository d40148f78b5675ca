"""``python -m timm_modcl.cli``: the ``modcl`` command line."""
import sys

from . import main

if __name__ == '__main__':
    sys.exit(main())
