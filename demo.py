"""`make demo`: the main job on the embedded default (Fashion-MNIST, a small timm ResNet, CPU).

Trains ``configs/fmnist_default.yaml`` when its checkpoint is missing, then reports its test
accuracy and the training time.
"""

import json
import sys
from pathlib import Path

from rfd.cli import run_cli, train_main

RUN = Path("runs/fmnist_default")


def main(argv: list[str] | None = None) -> None:
    result_file = RUN / "result.json"
    if not result_file.exists():
        print("demo: training the embedded default (configs/fmnist_default.yaml)")
        train_main(["--config", "fmnist_default.yaml", *(argv or [])])
    result = json.loads(result_file.read_text())
    print(
        f"demo: fmnist_default test accuracy {100 * result['test_acc']:.2f}% "
        f"after {result['train_seconds']:.0f} s of training; checkpoint {result['best_checkpoint']}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
