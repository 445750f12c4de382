"""A binding Perfect Corp-shaped rate budget: ``pace.py budget`` under its old name.

    python bench/ratelimit.py --images 100

Kept for the old command line; ``bench/pace.py budget --help`` has every option.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import pace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
    return pace.main(["budget", "--n", str(args.images)])


if __name__ == "__main__":
    sys.exit(main())
