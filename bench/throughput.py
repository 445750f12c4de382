"""Throughput of the pipeline beside the plain loop: ``pace.py async`` then ``pace.py sync``.

    python bench/throughput.py --images 1000 --concurrency 64

Kept for the old command line; ``bench/pace.py`` has every benchmark and option.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import pace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    n, c = args.images, args.concurrency
    code = pace.main(["async", "--cases", f"{n}x{c}"])
    return code or pace.main(["sync", "--n", str(n), "--concurrency", str(c)])


if __name__ == "__main__":
    sys.exit(main())
