"""How fast the phantom generator writes a data set (images, reports, questions, all files), per size.

python benchmarks/phantoms_speed.py --n 1000 --sizes 64 128
"""

import argparse
import logging
import tempfile
import time

from mmed_rag.data.phantoms import PhantomConfig, make_phantoms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000], help="images per run")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sides in pixels")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    print(f"{'n':>6} {'size':>5} {'seconds':>8} {'images/s':>9}")
    for n in args.n:
        for size in args.sizes:
            with tempfile.TemporaryDirectory() as out:
                started = time.perf_counter()
                make_phantoms(PhantomConfig(out=out, n=n, size=size))
                seconds = time.perf_counter() - started
            print(f"{n:>6} {size:>5} {seconds:>8.2f} {n / seconds:>9.0f}")


if __name__ == "__main__":
    main()
