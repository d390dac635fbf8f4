"""Attack defended models: ``python evaluate.py --defense feature --attack nes``.

``--defense`` / ``--attack`` take one name, several (comma-separated) or ``all``; the grid runs
every pair and prints one table in the paper's layout. ``python evaluate.py --help`` lists options.
"""

import sys

from rfd.cli import run_cli
from rfd.runner import evaluate_main

if __name__ == "__main__":
    sys.exit(run_cli(evaluate_main))
