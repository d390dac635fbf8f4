"""`make demo`: the main job on the embedded default (Fashion-MNIST, a small timm ResNet, CPU).

1. train ``configs/fmnist_default.yaml`` when its checkpoint is missing;
2. calibrate ν for input and penultimate-feature noise to a 2% clean-accuracy drop;
3. attack 100 class-balanced test images with Square, NES, SignHunter, RayS and SignFlip
   (Linf, eps 0.1, 1000 queries, majority-vote success) under no / input / feature defense;
4. print the table, write JSON/CSV/Markdown and plots under runs/demo, and an offline W&B run.
A rerun reuses finished cells (delete runs/demo to start over).
"""

import json
import sys
import time
from pathlib import Path

from rfd.cli import run_cli, train_main
from rfd.evaluation import quiet_lightning
from rfd.runner import evaluate_main

RUN = Path("runs/fmnist_default")


# the paper's five query attacks (the registry holds more: `evaluate.py --attack all` runs them all)
DEMO_ATTACKS = "square,nes,signhunter,rays,signflip"


def demo_args(extra: list[str]) -> list[str]:
    """evaluate.py's arguments for the demo, then ``extra`` (later flags win).

    The demo calibrates nu to a 2% drop unless ``extra`` fixes nu or names its own drop:
    evaluate.py refuses --nu beside --target-drop, so the default must not be added then.
    """
    own = any(a.split("=", 1)[0] in ("--nu", "--target-drop") for a in extra)
    drop = [] if own else ["--target-drop", "0.02"]
    return ["--defense", "none,input,feature", "--attack", DEMO_ATTACKS, "--n-images", "100",
            "--queries", "1000", *drop, "--criterion", "vote", "--run-dir", "runs/demo",
            *extra]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    t0 = time.perf_counter()
    result_file = RUN / "result.json"
    if not result_file.exists():
        print("demo: training the embedded default (configs/fmnist_default.yaml)")
        with quiet_lightning():  # no hardware banner or tips around the demo's output
            train_main(["--config", "fmnist_default.yaml"])
    result = json.loads(result_file.read_text())
    print(
        f"demo: fmnist_default test accuracy {100 * result['test_acc']:.2f}% "
        f"after {result['train_seconds']:.0f} s of training; checkpoint {result['best_checkpoint']}"
    )
    evaluate_main(demo_args(argv or []))
    print(f"demo: done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
