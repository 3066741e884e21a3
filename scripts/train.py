"""Entry point for launchers: ``python scripts/train.py --config RECIPE.yaml [--key value ...]``.

Same as ``sqlm train RECIPE.yaml``; use it with ``accelerate launch`` or ``torchrun``:

    accelerate launch --config_file recipes/accelerate/ddp.yaml scripts/train.py --config RECIPE.yaml
"""

import sys

from sqlm.cli import main


if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
