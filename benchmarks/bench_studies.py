"""Wall time of every scenario study and the ratios it reports, on this machine.

Each study compiles its models timing-only and runs them on the emulator (or evaluates
rooflines); this prints how long each takes and its ratios, the table of docs/studies.md.

    python benchmarks/bench_studies.py [--out DIR] [NAME ...]
"""
from __future__ import annotations

import argparse
import platform
import time

from trimem.host import studies


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(studies.STUDIES),
                        help="studies to run (default: all)")
    parser.add_argument("--out", default="out/studies", help="where PNG and JSON files go")
    args = parser.parse_args(argv)
    print(f"device: {platform.processor() or platform.machine()}, Python "
          f"{platform.python_version()}")
    print(f"{'study':<10} {'wall s':>7}  ratios")
    for name in args.names:
        start = time.perf_counter()
        result = studies.run_study(name, f"{args.out}/{name}")
        wall = time.perf_counter() - start
        ratios = ", ".join(f"{k} {v:.3g}" for k, v in result.ratios.items())
        print(f"{name:<10} {wall:>7.1f}  {ratios}")


if __name__ == "__main__":
    main()
