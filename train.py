"""Fine-tune a timm classifier: ``python train.py --config cifar10_vit.yaml [--trainer.devices 4]``.

Bare config names resolve under configs/. Every flag overrides the config; ``--print_config``
prints the resolved configuration and exits. Bad input (an unknown config, a flag of the wrong
type, a finished run, an unfinished run rerun with other settings) prints one ``error:`` line and
exits with status 2.
"""

import sys

from rfd.cli import train_main
from rfd.settings import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(train_main))
