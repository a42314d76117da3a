"""Put the latest demo's verdict, VQA table and plots into README.md (``make demo-readme``), never by hand.

The section between ``<!-- demo:begin -->`` and ``<!-- demo:end -->`` is replaced with tables rendered from the
demo folder's ``report.json`` (the same renderer as REPORT.md) and its plots, copied to ``docs/demo/``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from mmed_rag.atomic import atomic_write_text
from mmed_rag.demo.report import _image_use, verdicts, vqa_table

BEGIN, END = "<!-- demo:begin -->", "<!-- demo:end -->"
PLOTS = ("vqa_accuracy.png", "copying.png")


def _minutes(figures: dict) -> float:
    """The demo's own time: this run's steps, skipped ones at the time they took when they ran."""
    return sum(step["seconds"] for step in figures["steps"]) / 60


def section(figures: dict, assets: str) -> str:
    """The README section for a demo's ``report.json`` figures; plots linked under ``assets``."""
    first = figures["seeds"][0]
    config = figures["config"]
    lines = [
        BEGIN,
        f"Latest `make demo` ({'smoke, ' if config['smoke'] else ''}{config['n']} phantom images, seed "
        f"{config['seed']}"
        + (f", the SFT and RAG-PT repeated over {config['seeds']} seeds" if config["seeds"] > 1 else "")
        + f", {_minutes(figures):.1f} min of steps on the machine that ran it"
        + (", all seeds" if config["seeds"] > 1 else "")
        + "); regenerate this section with `make demo-readme` after `make demo`.",
        "",
        "| claim | result | evidence |",
        "|---|---|---|",
        *(f"| {claim} | **{result}** | {evidence} |" for claim, result, evidence in verdicts(figures)),
        *_image_use(first),
        "",
        "VQA accuracy on the phantom test split, 95% bootstrap intervals:",
        "",
        *vqa_table(first["vqa"]),
        "",
        " ".join(f"![{Path(plot).stem}]({assets}/{plot})" for plot in PLOTS),
        END,
    ]
    return "\n".join(lines)


def update_readme(demo_dir: str | Path, readme: str | Path = "README.md", assets: str = "docs/demo") -> None:
    demo_dir, readme = Path(demo_dir), Path(readme)
    figures = json.loads((demo_dir / "report.json").read_text(encoding="utf-8"))
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} section to replace")
    target = readme.parent / assets
    target.mkdir(parents=True, exist_ok=True)
    for plot in PLOTS:
        shutil.copyfile(demo_dir / plot, target / plot)
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    atomic_write_text(readme, head + section(figures, assets) + tail)


if __name__ == "__main__":
    update_readme(*sys.argv[1:])
