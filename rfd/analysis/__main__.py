"""``python -m rfd.analysis {ratios,magnitude,theorem1,layer-sweep,strength-sweep,first-order}``."""

import sys

from rfd.analysis.cli import main

if __name__ == "__main__":
    sys.exit(main())
