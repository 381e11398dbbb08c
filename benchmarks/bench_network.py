"""Network Fisher-KPP throughput: batched Numba DOPRI5 vs a loop of scipy solve_ivp (RK45).

Prints JSON. Default connectome: the HCP DK-83 test matrix in ../shared/data when present
(allowed for benchmarks, not for the package at run time), else the package's DK-68.
Usage: python benchmarks/bench_network.py [--connectome CSV] [--sets 1000] [--years 20]
       [--threads N] [--scipy-solves 30]
"""

import argparse
import json
from pathlib import Path

import numpy as np

from neurohybrid.bench import bench_network

HCP83 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "connectome-hcp-dk83" / "hcp-scale1-adjacency-matrix.csv"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connectome", type=Path, default=HCP83 if HCP83.exists() else None,
                        help="headerless comma-separated symmetric matrix (default: HCP DK-83 if present)")
    parser.add_argument("--sets", type=int, default=1000)
    parser.add_argument("--years", type=float, default=20.0)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, None],
                        help="thread counts to measure (None = all CPUs)")
    parser.add_argument("--scipy-solves", type=int, default=30)
    args = parser.parse_args()
    weights = None
    if args.connectome is not None:
        weights = np.loadtxt(args.connectome, delimiter=",")
    results = []
    for threads in args.threads:
        threads = None if threads in (None, "None") else int(threads)
        res = bench_network(weights, n_sets=args.sets, years=args.years, n_scipy=args.scipy_solves, threads=threads)
        if args.connectome is not None:
            res["connectome"] = str(args.connectome.name)
        res["threads"] = threads if threads is not None else "all"
        results.append(res)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
