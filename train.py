"""Fine-tune a timm classifier: ``python train.py --config cifar10_vit.yaml [--trainer.devices 4]``.

Bare config names resolve under configs/. Every flag overrides the config; ``--print_config``
prints the resolved configuration and exits.
"""

import sys

from rfd.cli import run_cli, train_main

if __name__ == "__main__":
    sys.exit(run_cli(train_main))
