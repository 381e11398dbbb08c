"""Stroke tissue-death throughput (voxel-hours per second) of the per-voxel Xue 2021 model.

Prints JSON. Usage: python benchmarks/bench_stroke.py [--shape 64 64 48] [--hours 24] [--threads N]
"""

import argparse
import json

from neurohybrid.bench import bench_stroke


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 48])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(bench_stroke(tuple(args.shape), hours=args.hours, threads=args.threads), indent=2))


if __name__ == "__main__":
    main()
