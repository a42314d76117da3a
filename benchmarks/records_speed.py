"""What typed, validated reading costs over a bare ``json.load``, on the real release files (side by side).

python benchmarks/records_speed.py [--release ../shared/mmed-rag-release] [--repeat 5]
"""

import argparse
import json
import time
from pathlib import Path

from mmed_rag.data.records import read_records


def bare_load(path: Path) -> int:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return len([json.loads(line) for line in text.splitlines() if line.strip()])
    return len(json.loads(text))


def best_of(repeat: int, function, *args) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, default=Path(__file__).resolve().parents[2] / "shared/mmed-rag-release")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    files = sorted(args.release.rglob("*.json*"))
    if not files:
        raise SystemExit(f"no release files under {args.release}")
    print(f"{'file':<34} {'records':>7} {'json (ms)':>9} {'mmed-rag (ms)':>13} {'ratio':>6}")
    for path in files:
        bare = best_of(args.repeat, bare_load, path)
        typed = best_of(args.repeat, read_records, path)
        print(f"{path.name:<34} {bare_load(path):>7} {bare * 1e3:>9.1f} {typed * 1e3:>13.1f} {typed / bare:>6.2f}")


if __name__ == "__main__":
    main()
