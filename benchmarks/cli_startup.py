"""How long the command line takes before it does anything: ``--help`` of the tool and of stages (whole process).

python benchmarks/cli_startup.py [--repeat 5] [--baseline DIR]

``--baseline DIR``: another checkout of mmed-rag (e.g. a ``git worktree`` of an earlier commit) timed side by side,
run for run, so the ratio holds on a noisy machine.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (
    ["--help"],
    ["generate", "--help"],
    ["finetune-clip", "--help"],
    ["train-domain", "--help"],
    ["train-sft", "--help"],
    ["train-dpo", "--help"],
)


def wall_seconds(argv: list[str], source: Path) -> float:
    """One run of ``mmed-rag ARGV`` from the checkout ``source`` (its folder first on the path, as ``-m`` puts it)."""
    env = dict(os.environ, PYTHONPATH=str(source))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmed_rag.cli", *argv], cwd=source, env=env, capture_output=True, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None, help="an earlier checkout to compare with")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    print(f"{'command':<30} {'this (s)':>9}" + (f" {'baseline (s)':>12} {'ratio':>6}" if args.baseline else ""))
    for argv in COMMANDS:
        ours, theirs = [], []
        for _ in range(args.repeat):  # alternate, so drift in the machine's speed hits both alike
            ours.append(wall_seconds(argv, here))
            if args.baseline:
                theirs.append(wall_seconds(argv, args.baseline))
        line = f"{'mmed-rag ' + ' '.join(argv):<30} {statistics.median(ours):>9.2f}"
        if args.baseline:
            line += f" {statistics.median(theirs):>12.2f} {statistics.median(ours) / statistics.median(theirs):>6.2f}"
        print(line)


if __name__ == "__main__":
    main()
