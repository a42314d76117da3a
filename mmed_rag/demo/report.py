"""REPORT.md: what the demo measured, read back from the files the run wrote, and a verdict on the paper's claims.

:func:`collect` gathers every figure into ``report.json`` (from metrics files, prediction files and manifests in
the demo folder, never from memory); :func:`render` turns that into Markdown. A test recomputes the accuracies
from the prediction files and compares them with ``report.json`` and the Markdown.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from mmed_rag.atomic import atomic_path, atomic_write_text
from mmed_rag.demo.standin import PRETRAINING_FILE
from mmed_rag.jsonl import read_jsonl

MODALITIES = ("radiology", "pathology", "ophthalmology")
CONDITIONS = {
    "no_rag": "no RAG",
    "rag_fixed": "RAG (fixed k)",
    "rag_adaptive": "RAG (adaptive k)",
    "rag_pt": "RAG + RAG-PT",
}

#: The text metrics REPORT.md shows of the written reports (CIDEr runs 0-10, the others 0-1).
REPORT_METRICS = ("BLEU-1", "BLEU-4", "ROUGE-L", "METEOR", "CIDEr")


def _load(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _estimate(block: dict) -> dict:
    """``{"value", "low", "high"}`` of an eval metric entry (``ci95`` may be absent with no bootstrap)."""
    low, high = block.get("ci95") or (None, None)
    return {"value": block["value"], "low": low, "high": high}


def _vqa(metrics_file: Path) -> dict:
    metrics = _load(metrics_file)
    blocks = {"overall": metrics["overall"], **metrics["by_modality"]}
    figures = {}
    for group, block in blocks.items():
        figures[group] = {name: _estimate(block[name]) for name in ("accuracy", "f1", "auc")}
        counts = block["counts"]  # the accuracy of always giving the commoner gold answer: the bar to beat
        figures[group]["baseline"] = max(counts["gold_yes"], counts["gold_no"]) / counts["n"]
    return figures


def _report_agreement(run: Path) -> dict:
    """How often the prompt's reports are right about the finding asked of (majority of those retrieved; top one)."""
    from mmed_rag.data.phantoms import findings_in_report

    counts = {modality: {"majority": 0, "top1": 0, "total": 0, "k": 0} for modality in MODALITIES}
    for line in read_jsonl(run):
        modality, finding = line["modality"], line["finding"]
        truth = findings_in_report(line["modality"], line["report"])[finding]
        said = [findings_in_report(modality, report).get(finding) for report in line["reference_reports"]]
        said = [value for value in said if value is not None]
        entry = counts[modality]
        entry["total"] += 1
        entry["k"] += len(line["reference_reports"])
        entry["top1"] += bool(said) and said[0] == truth
        entry["majority"] += bool(said) and (sum(said) * 2 > len(said)) == truth and sum(said) * 2 != len(said)
    return {
        modality: {
            "majority": entry["majority"] / entry["total"],
            "top1": entry["top1"] / entry["total"],
            "mean_k": entry["k"] / entry["total"],
            "total": entry["total"],
        }
        for modality, entry in counts.items()
        if entry["total"]
    }


def _report_findings(run: Path) -> dict:
    """How often the written reports state a finding of their image right (each report read back sentence by
    sentence, every finding of its modality; one not stated counts as wrong), per modality and overall, with
    Wilson 95% intervals."""
    from mmed_rag.data.phantoms import FINDINGS, findings_in_report
    from mmed_rag.eval.copying import Share

    right = {modality: [0, 0] for modality in MODALITIES}
    for line in read_jsonl(run):
        modality = line["modality"]
        truth, said = findings_in_report(modality, line["report"]), findings_in_report(modality, line["prediction"])
        for finding in FINDINGS[modality]:
            right[modality][0] += said.get(finding) == truth[finding]
            right[modality][1] += 1
    shares = {modality: Share(*counts).to_dict() for modality, counts in right.items() if counts[1]}
    shares["overall"] = Share(sum(c[0] for c in right.values()), sum(c[1] for c in right.values())).to_dict()
    return shares


def _text_metric(block: dict, name: str) -> dict:
    """``{"value", "low", "high"}`` of a report metric in an eval group (no interval without a bootstrap)."""
    low, high = block.get("ci95", {}).get(name, (None, None))
    return {"value": block[name], "low": low, "high": high}


def _report_figures(folder: Path) -> dict:
    """Per condition: the findings the reports state right, and the text metrics when they were computed."""
    runs = {
        "no_rag": ("before", "no_rag"),
        "rag_fixed": ("before", "rag_fixed"),
        "rag_pt": ("after", "rag_fixed"),
    }
    figures = {}
    for condition, (phase, mode) in runs.items():
        run = folder / "runs" / phase / f"report_{mode}.jsonl"
        if not run.is_file():
            continue
        figures[condition] = {"findings_right": _report_findings(run)}
        metrics = folder / "eval" / phase / "report" / mode / "metrics.json"
        if metrics.is_file():
            loaded = _load(metrics)
            figures[condition]["metrics"] = {
                group: {name: _text_metric(block, name) for name in REPORT_METRICS}
                for group, block in {"overall": loaded["overall"], **loaded["by_modality"]}.items()
            }
    return figures


def _parameters(model: Path) -> int:
    """Parameter count of a saved model, from its safetensors header (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(shard, framework="numpy") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a dict)
                total += math.prod(weights.get_slice(name).get_shape())
    return total


def _auc_range(auc: dict[str, float]) -> str:
    return f"{min(auc.values()):.2f}-{max(auc.values()):.2f} (mean {statistics.fmean(auc.values()):.2f})"


def _seed_figures(out: Path, seed: int) -> dict:
    folder = out / f"seed{seed}"
    figures: dict[str, Any] = {"seed": seed, "vqa": {}, "copying": {}}
    for mode in ("no_rag", "rag_fixed", "rag_adaptive"):
        figures["vqa"][mode] = _vqa(folder / "eval" / "before" / mode / "metrics.json")
    figures["copying"]["before"] = _load(folder / "eval" / "before" / "copying" / "metrics.json")
    figures["reports_right"] = _report_agreement(folder / "runs" / "before" / "rag_fixed.jsonl")
    figures["reports"] = _report_figures(folder)
    model = out / "models"
    figures["vision_auc"] = _load(model / f"vision-seed{seed}" / PRETRAINING_FILE)["val_auc"]
    figures["parameters"] = _parameters(model / f"sft-seed{seed}" / "standin")
    pairs = folder / "rag-pt" / "pairs" / "summary.json"
    figures["pairs"] = _load(pairs) if pairs.is_file() else None
    after = folder / "eval" / "after"
    if (after / "rag_fixed" / "metrics.json").is_file():
        figures["vqa"]["rag_pt"] = _vqa(after / "rag_fixed" / "metrics.json")
        figures["vqa"]["rag_pt_no_rag"] = _vqa(after / "no_rag" / "metrics.json")
        figures["copying"]["after"] = _load(after / "copying" / "metrics.json")
    return figures


def collect(demo, seconds: float) -> dict:
    """Every figure the report shows, read from the files of ``demo.out``."""
    out = demo.out
    config = demo.config
    manifest = _load(demo.data / "manifest.json")
    figures: dict[str, Any] = {
        "config": {key: value for key, value in vars(config).items()},
        "wall_seconds": seconds,
        "data": {"counts": manifest["counts"], "questions": _load(out / ".steps" / "questions.json")["result"]},
        "sft_data": _load(out / ".steps" / "sft-data.json")["result"],
        "retrieval": {},
        "steps": [{"name": r.name, "seconds": r.seconds, "skipped": r.skipped} for r in demo.steps.records],
    }
    for modality in MODALITIES:
        metrics = _load(out / "eval" / "retrieval" / modality / "metrics.json")
        figures["retrieval"][modality] = {
            "recall": metrics["recall"],
            "chance": metrics["chance"],
            "queries": metrics["queries"],
        }
    domain = _load(out / "domain" / "manifest.json")
    test = domain["metrics"]["test"]
    figures["domain"] = {"accuracy": test["accuracy"], "images": test.get("images", test.get("n"))}
    figures["seeds"] = [_seed_figures(out, config.seed + offset) for offset in range(config.seeds)]
    return figures


# -- verdict -----------------------------------------------------------------------------------------------------


def _separated(high: dict, low: dict) -> bool:
    """The 95% intervals do not overlap and ``high`` is the higher."""
    return high["low"] is not None and low["high"] is not None and high["low"] > low["high"]


def _gains(vqa: dict) -> list[str]:
    """The modalities where RAG's VQA accuracy interval lies above no RAG's."""
    return [m for m in MODALITIES if _separated(vqa["rag_fixed"][m]["accuracy"], vqa["no_rag"][m]["accuracy"])]


def _mean_interval(values: list[float]) -> tuple[float, float, float] | None:
    """Mean and a t-based 95% interval over seeds (None below two seeds)."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    mean = statistics.fmean(values)
    half = float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def verdicts(figures: dict) -> list[tuple[str, str, str]]:
    """(claim, held / did not hold / not tested, the evidence) for each claim the demo can test."""
    first = figures["seeds"][0]
    rows = []
    retrieval = figures["retrieval"]
    above = [m for m in MODALITIES if retrieval[m]["recall"]["5"] >= 3 * retrieval[m]["chance"]["5"]]
    rows.append(
        (
            "A fine-tuned retriever finds the right report far above chance (recall@5 at least three times chance)",
            "held" if len(above) == len(MODALITIES) else "did not hold",
            "; ".join(
                f"{m} {retrieval[m]['recall']['5']:.2f} vs chance {retrieval[m]['chance']['5']:.2f}" for m in MODALITIES
            ),
        )
    )
    accuracy = figures["domain"]["accuracy"]
    rows.append(
        (
            "Domain identification routes images to their modality (accuracy >= 99%)",
            "held" if accuracy >= 0.99 else "did not hold",
            f"test accuracy {accuracy:.3f}",
        )
    )
    vqa = first["vqa"]
    gains = _gains(vqa)
    rows.append(
        (
            "RAG raises VQA accuracy over the same model without retrieval, on at least two modalities "
            "(95% intervals apart)",
            "held" if len(gains) >= 2 else "did not hold",
            "; ".join(
                f"{m} {vqa['no_rag'][m]['accuracy']['value']:.3f} -> {vqa['rag_fixed'][m]['accuracy']['value']:.3f}"
                for m in MODALITIES
            )
            + f" (apart on: {', '.join(gains) or 'none'})",
        )
    )
    reports = first.get("reports", {})
    if "no_rag" in reports and "rag_fixed" in reports:
        plain, rag = reports["no_rag"], reports["rag_fixed"]
        right = [plain["findings_right"]["overall"], rag["findings_right"]["overall"]]
        apart = right[1]["ci95"][0] > right[0]["ci95"][1]
        metrics = ""
        if "metrics" in plain and "metrics" in rag:
            metrics = "; " + ", ".join(
                f"{name} {plain['metrics']['overall'][name]['value']:.3f} -> "
                f"{rag['metrics']['overall'][name]['value']:.3f}"
                for name in ("BLEU-4", "ROUGE-L", "METEOR")
            )
        rows.append(
            (
                "RAG makes the written reports more accurate (findings stated right, overall; 95% intervals apart)",
                "held" if apart else "did not hold",
                f"findings right {_share(right[0])} -> {_share(right[1])}{metrics}",
            )
        )
    fixed, adaptive = vqa["rag_fixed"]["overall"]["accuracy"], vqa["rag_adaptive"]["overall"]["accuracy"]
    rows.append(
        (
            "Adaptive k (the ratio rule) does at least as well as fixed k",
            "held"
            if adaptive["value"] >= fixed["value"]
            else ("did not hold" if _separated(fixed, adaptive) else "inconclusive"),
            f"overall {fixed['value']:.3f} (fixed) vs {adaptive['value']:.3f} (adaptive)",
        )
    )
    if "after" not in first["copying"]:
        rows.append(("RAG-PT lowers copy reliance without lowering accuracy", "not tested", "no preference pairs"))
        return rows
    before, after = first["copying"]["before"], first["copying"]["after"]
    copy_before, copy_after = before["copy_reliance"], after["copy_reliance"]
    accuracy_before = vqa["rag_fixed"]["overall"]["accuracy"]
    accuracy_after = vqa["rag_pt"]["overall"]["accuracy"]
    known = copy_after["value"] is not None and copy_before["value"] is not None
    # Lower beyond noise: the Wilson intervals apart (one seed), or the seeds' interval of the change below zero.
    apart = known and copy_before["ci95"][0] > copy_after["ci95"][1]
    lower = known and copy_after["value"] < copy_before["value"]
    kept = accuracy_after["value"] >= accuracy_before["value"] or not _separated(accuracy_before, accuracy_after)
    seeds = figures["seeds"]
    spread = ""
    changes = [
        s["copying"]["after"]["copy_reliance"]["value"] - s["copying"]["before"]["copy_reliance"]["value"]
        for s in seeds
        if "after" in s["copying"]
        and s["copying"]["after"]["copy_reliance"]["value"] is not None
        and s["copying"]["before"]["copy_reliance"]["value"] is not None
    ]
    interval = _mean_interval(changes)
    if interval is not None:
        mean, low, high = interval
        # Over seeds the seeds decide: lower on average, and beyond noise when the interval is below zero.
        lower, apart = known and mean < 0, high < 0
        excludes = "excludes" if low > 0 or high < 0 else "does not exclude"
        spread = (
            f"; over {len(changes)} seeds the change is {mean:+.3f}, 95% interval [{low:+.3f}, {high:+.3f}] "
            f"({excludes} zero)"
        )
    rows.append(
        (
            "RAG-PT lowers the copy-reliance share without lowering accuracy (intervals apart; over seeds: the "
            "change's interval below zero)",
            ("held" if apart else "inconclusive: lower, within noise") if lower and kept else "did not hold",
            f"copy reliance {_share(copy_before)} -> {_share(copy_after)}; accuracy with RAG "
            f"{accuracy_before['value']:.3f} -> {accuracy_after['value']:.3f}{spread}",
        )
    )
    rows.append(
        (
            "RAG-PT raises accuracy over RAG alone (95% intervals apart)",
            "held" if _separated(accuracy_after, accuracy_before) else "did not hold",
            f"overall {accuracy_before['value']:.3f} -> {accuracy_after['value']:.3f}",
        )
    )
    return rows


# -- rendering ---------------------------------------------------------------------------------------------------


def _cell(estimate: dict | None) -> str:
    if estimate is None or estimate["value"] is None:
        return "n/a"
    if estimate["low"] is None:
        return f"{estimate['value']:.3f}"
    return f"{estimate['value']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"


def _image_use(seed: dict) -> list[str]:
    """A warning when the model without reports is no better than chance at ranking (AUC interval holds 0.5)."""
    auc = seed["vqa"]["no_rag"]["overall"].get("auc")
    if not auc or auc["low"] is None or not auc["low"] <= 0.5 <= auc["high"]:
        return []
    return [
        "",
        f"Without reports the stand-in ranks no better than chance (AUC {_cell(auc)}): it has not learned to read "
        "the images, only the reports. Its answers then hardly depend on the image, so copy reliance is high by "
        "construction and the noise-image comparisons (and RAG-PT's pairs built on them) measure little.",
    ]


def _skipped_note(figures: dict) -> str:
    """How long the steps this run skipped took when they ran, so a rerun's time is not read as the demo's."""
    skipped = [step["seconds"] for step in figures["steps"] if step["skipped"]]
    if not skipped:
        return ""
    return f" ({len(skipped)} unchanged steps skipped, which took {sum(skipped) / 60:.1f} minutes when they ran)"


def _share(share: dict | None) -> str:
    if share is None or share.get("value") is None:
        return "n/a"
    low, high = share["ci95"]
    return f"{share['value']:.3f} ({share['count']}/{share['total']}) [{low:.3f}, {high:.3f}]"


def _figure(path: Path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 3.6), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def vqa_table(vqa: dict) -> list[str]:
    """Accuracy per modality and condition (95% intervals), and the accuracy of always giving the commoner gold
    answer: the bar to beat, since the phantom questions are not balanced. Lines of markdown."""
    conditions = [name for name in CONDITIONS if name in vqa]
    lines = [
        "| | " + " | ".join(CONDITIONS[name] for name in conditions) + " | always the commoner answer |",
        "|---|" + "---|" * (len(conditions) + 1),
    ]
    for group in [*MODALITIES, "overall"]:
        cells = [_cell(vqa[name][group]["accuracy"]) for name in conditions]
        lines.append(f"| {group} | " + " | ".join(cells) + f" | {vqa[conditions[0]][group]['baseline']:.3f} |")
    return lines


def plot_vqa(figures: dict, path: Path) -> Path:
    """Grouped bars: accuracy per modality and condition, with 95% intervals, and per group the accuracy of always
    giving its commoner gold answer (not 0.5: the phantom questions are not balanced)."""
    import numpy as np

    vqa = figures["seeds"][0]["vqa"]
    conditions = [name for name in CONDITIONS if name in vqa]
    groups = [*MODALITIES, "overall"]
    figure = _figure(path)
    axis = figure.subplots()
    width = 0.8 / len(conditions)
    colours = ["#9e9e9e", "#1f77b4", "#6baed6", "#d62728"]
    for position, condition in enumerate(conditions):
        values = [vqa[condition][group]["accuracy"] for group in groups]
        x = np.arange(len(groups)) + (position - (len(conditions) - 1) / 2) * width
        heights = [value["value"] for value in values]
        errors = _error_bars(heights, [value["low"] for value in values], [value["high"] for value in values])
        axis.bar(x, heights, width, yerr=errors, capsize=2, label=CONDITIONS[condition], color=colours[position])
    baseline_label = "always the commoner gold answer"
    for position, group in enumerate(groups):
        axis.hlines(
            vqa[conditions[0]][group]["baseline"], position - 0.45, position + 0.45, colors="black", linestyles=":",
            linewidth=1.5, label=baseline_label,
        )  # fmt: skip
        baseline_label = None
    axis.set_xticks(range(len(groups)), groups)
    axis.set_ylim(0, 1)
    axis.set_ylabel("VQA accuracy (95% interval)")
    axis.set_title("Yes/no VQA accuracy on the phantom test split")
    axis.legend(fontsize=7, loc="lower right", ncols=3)
    _save(figure, path)
    return path


def _error_bars(values: list[float], lows: list, highs: list) -> list[list[float]]:
    """matplotlib's yerr from interval ends; none where an end is unknown, and never negative (a bootstrap
    percentile interval of a degenerate sample can sit beside its point estimate by rounding)."""
    below = [max(0.0, value - low) if low is not None else 0.0 for value, low in zip(values, lows, strict=True)]
    above = [max(0.0, high - value) if high is not None else 0.0 for value, high in zip(values, highs, strict=True)]
    return [below, above]


def plot_copying(figures: dict, path: Path) -> Path:
    """Copy-reliance and misled shares before and after RAG-PT, with 95% intervals."""
    import numpy as np

    copying = figures["seeds"][0]["copying"]
    phases = [phase for phase in ("before", "after") if phase in copying]
    names = {"copy_reliance": "copy reliance", "misled": "misled by reports", "noised_still_correct": "right on noise"}
    figure = _figure(path)
    axis = figure.subplots()
    width = 0.8 / len(phases)
    for position, phase in enumerate(phases):
        shares = [copying[phase][name] for name in names]
        x = np.arange(len(names)) + (position - (len(phases) - 1) / 2) * width
        values = [share["value"] if share and share["value"] is not None else 0 for share in shares]
        known = [share if share and share["value"] is not None else None for share in shares]
        errors = _error_bars(
            values, [share and share["ci95"][0] for share in known], [share and share["ci95"][1] for share in known]
        )
        label = "before RAG-PT" if phase == "before" else "after RAG-PT"
        axis.bar(x, values, width, yerr=errors, capsize=3, label=label, color=["#1f77b4", "#d62728"][position])
    axis.set_xticks(range(len(names)), list(names.values()))
    axis.set_ylim(0, 1)
    axis.set_ylabel("share (95% interval)")
    axis.set_title("How much the model leans on the retrieved reports")
    axis.legend(fontsize=8)
    _save(figure, path)
    return path


def _report_section(reports: dict, config: dict) -> list[str]:
    """Report generation: the findings stated right per modality (with intervals), and the text metrics."""
    conditions = [condition for condition in CONDITIONS if condition in reports]
    if not conditions:
        return []
    lines = [
        "## Report generation",
        "",
        "Each test image's report written by the stand-in, without and with a retrieved report in the prompt. "
        "Findings right: of every finding of the image's modality, the share the written report states right "
        "(present or absent; a finding it does not mention counts as wrong), read back from the phantom wording, "
        "with Wilson 95% intervals.",
        "",
        "| findings right | " + " | ".join(CONDITIONS[c] for c in conditions) + " |",
        "|---|" + "---|" * len(conditions),
    ]
    for group in [*MODALITIES, "overall"]:
        cells = [_share(reports[c]["findings_right"].get(group)) for c in conditions]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    scored = [c for c in conditions if "metrics" in reports[c]]
    if not scored:
        return [*lines, "", "Text metrics not computed: they need Java (`make java`).", ""]
    lines += [
        "",
        "Text metrics (pycocoevalcap, corpus level, 95% intervals from "
        f"{config['report_bootstrap']} bootstrap resamples; CIDEr runs 0-10):",
        "",
        "| | | " + " | ".join(REPORT_METRICS) + " |",
        "|---|---|" + "---|" * len(REPORT_METRICS),
    ]
    for group in [*MODALITIES, "overall"]:
        for condition in scored:
            block = reports[condition]["metrics"][group]
            cells = " | ".join(_cell(block[name]) for name in REPORT_METRICS)
            lines.append(f"| {group} | {CONDITIONS[condition]} | {cells} |")
    return [*lines, ""]


def render(figures: dict, out: Path) -> str:
    config = figures["config"]
    first = figures["seeds"][0]
    seed = first["seed"]
    lines = [
        "# MMed-RAG on the phantoms: what held",
        "",
        f"Written by `mmed-rag demo` in {figures['wall_seconds'] / 60:.1f} minutes{_skipped_note(figures)}. Every "
        "number below was computed from the files in this folder (`report.json` holds them all).",
    ]
    if config["smoke"]:
        lines += [
            "",
            "**Smoke run** (`--smoke`): fewer images and training steps; the numbers are noisy and the "
            "verdict below says little. Run `make demo` for the full demo.",
        ]
    lines += ["", "## Verdict", "", "| claim | result | evidence |", "|---|---|---|"]
    lines += [f"| {claim} | **{result}** | {evidence} |" for claim, result, evidence in verdicts(figures)]
    lines += [
        "",
        f"The stand-in Med-LVLM is a {first['parameters'] / 1e6:.2f}M-parameter LLaVA trained for minutes on 2 CPU "
        "cores, not LLaVA-Med; the phantoms are drawn, not scanned. What transfers is the method's logic, not its "
        "effect sizes.",
        *_image_use(first),
        "",
        "## Data",
        "",
        "| modality | train (corpus) | tuning (val) | test |",
        "|---|---|---|---|",
    ]
    for modality, counts in figures["data"]["counts"].items():
        lines.append(f"| {modality} | {counts['train']} | {counts['val']} | {counts['test']} |")
    questions = figures["data"]["questions"]
    lines += [
        "",
        f"Questions: {questions['train']} on train images and {questions['tune_sft']} on half the tuning images "
        f"(the stand-in's SFT, each once with {figures['config']['fixed_k']} retrieved report(s) and once without, "
        "and each of those images' report to write, likewise: "
        f"{figures['sft_data']['rows']} rows, {figures['sft_data'].get('report_rows', 0)} of them reports; a "
        "training image's own report, which the corpus holds, is never among its reports), "
        f"{questions['tune_pt']} on the other half (RAG-PT's pairs), {questions['test']} on test images and their "
        f"{questions.get('test_reports', 0)} reports (every number here).",
        "",
        "![phantoms](data_grid.png)",
        "",
        "## Retrieval",
        "",
        "Each test image against its modality's test reports (held out from the retriever's training).",
        "",
        "| modality | recall@1 | recall@5 | recall@10 | chance@5 | queries |",
        "|---|---|---|---|---|---|",
    ]
    for modality, block in figures["retrieval"].items():
        recall = block["recall"]
        lines.append(
            f"| {modality} | {recall['1']:.3f} | {recall['5']:.3f} | {recall['10']:.3f} | "
            f"{block['chance']['5']:.3f} | {block['queries']} |"
        )
    lines += [
        "",
        "How often the reports put in the prompt (fixed k) are right about the finding a test question asks of: "
        "this bounds what retrieval can add.",
        "",
        "| modality | top report right | majority of reports right | mean k |",
        "|---|---|---|---|",
    ]
    for modality, block in first["reports_right"].items():
        lines.append(f"| {modality} | {block['top1']:.3f} | {block['majority']:.3f} | {block['mean_k']:.1f} |")
    lines += [
        "",
        "## Domain identification",
        "",
        f"Test accuracy {figures['domain']['accuracy']:.3f}.",
        "",
        "![domain confusion matrix](domain/confusion_test.png)",
        "",
        "## VQA accuracy (95% bootstrap intervals)",
        "",
        *vqa_table(first["vqa"]),
    ]
    lines += ["", "| overall | F1 (yes) | AUC |", "|---|---|---|"]
    for condition in CONDITIONS:
        if condition in first["vqa"]:
            overall = first["vqa"][condition]["overall"]
            lines.append(f"| {CONDITIONS[condition]} | {_cell(overall['f1'])} | {_cell(overall['auc'])} |")
    lines += ["", "![VQA accuracy](vqa_accuracy.png)", "", "## Copy reliance", ""]
    lines += [
        "Copy reliance: of the questions answered right with reports and the real image, the share still right "
        "when the image is replaced by noise (the reports alone carry the answer). Misled: of the questions right "
        "without reports, the share wrong with them.",
        "",
        "| | " + " | ".join(phase for phase in ("before", "after") if phase in first["copying"]) + " |",
        "|---|" + "---|" * len(first["copying"]),
    ]
    for name, label in (
        ("copy_reliance", "copy reliance"),
        ("misled", "misled"),
        ("noised_still_correct", "right with reports on a noise image"),
    ):
        lines.append(
            f"| {label} | " + " | ".join(_share(first["copying"][phase][name]) for phase in first["copying"]) + " |"
        )
    lines += ["", "![copy reliance](copying.png)", ""]
    lines += _report_section(first["reports"], config)
    pairs = first["pairs"]
    lines += ["## RAG-PT", ""]
    if pairs is None:
        lines += ["No pairs were built."]
    else:
        lines += [
            f"Pairs from the model's own answers on {pairs['items']} tuning questions: stage 1 {pairs['stage1']}, "
            f"stage 2 {pairs['stage2']}. LoRA r={config['lora_r']}, {config['dpo_steps']} steps per stage at "
            f"learning rate {config['dpo_learning_rate']}, beta {config['dpo_beta']}: the original's 2e-7 to 5e-7 "
            "do not move a model this small within minutes.",
            "",
            "| pairs | count |",
            "|---|---|",
        ]
        lines += [f"| {name} | {count} |" for name, count in sorted(pairs["pairs"].items())]
        lines += [
            "",
            f"![stage 1](seed{seed}/rag-pt/adapter/stage1/curves.png) "
            f"![stage 2](seed{seed}/rag-pt/adapter/stage2/curves.png)",
        ]
    lines += [
        "",
        "## The stand-in model",
        "",
        f"A LLaVA built from config ({first['parameters']:,} parameters). Its vision encoder is pretrained first, "
        f"{config['vision_epochs']} epochs telling the training images' findings apart (a stand-in for the "
        "pretrained CLIP encoder a real Med-LVLM starts from; trained from scratch through the language model "
        "alone, it never learned to read the phantoms); on held-out tuning images a linear read-out of its "
        f"features separates the findings with AUC {_auc_range(first['vision_auc'])}. Then `train-sft`, the "
        f"encoder frozen, in three stages (batch {config['sft_batch_size']}, learning rate "
        f"{config['sft_learning_rate']}): `image`, {config['sft_image_steps']} steps on the questions without "
        f"reports; `reports`, {config['sft_reports_steps']} steps on the questions with a retrieved report and a "
        f"{config['sft_report_share']:.0%} share per pass of the reports to write with one, so that it learns to "
        f"read a report; `standin`, {config['sft_steps']} steps at half the rate on those, a "
        f"{config['sft_plain_share']:.0%} share per pass of the questions without reports and a "
        f"{config['sft_mix_report_share']:.0%} share of the reports to write, "
        "with a retrieved report and without. A model this small that meets every kind of prompt from the start "
        "learns only the prior answer.",
        "",
        " ".join(
            f"![SFT {stage}](models/sft-seed{seed}/{stage}/curves.png)" for stage in ("image", "reports", "standin")
        ),
    ]
    if len(figures["seeds"]) > 1:
        lines += [
            "",
            "## Seeds",
            "",
            "| seed | no RAG | RAG | RAG apart on | RAG + RAG-PT | copy reliance before | after |",
            "|---|---|---|---|---|---|---|",
        ]
        for block in figures["seeds"]:
            vqa = block["vqa"]
            after = block["copying"].get("after")
            lines.append(
                f"| {block['seed']} | {vqa['no_rag']['overall']['accuracy']['value']:.3f} | "
                f"{vqa['rag_fixed']['overall']['accuracy']['value']:.3f} | {', '.join(_gains(vqa)) or 'none'} | "
                f"{vqa['rag_pt']['overall']['accuracy']['value']:.3f} | "
                f"{_share(block['copying']['before']['copy_reliance'])} | {_share(after and after['copy_reliance'])} |"
                if "rag_pt" in vqa
                else f"| {block['seed']} | (no RAG-PT) | | | | | |"
            )
    lines += ["", "## Wall time per step", "", "| step | seconds | |", "|---|---|---|"]
    for step in figures["steps"]:
        lines.append(f"| {step['name']} | {step['seconds']:.1f} | {'skipped (unchanged)' if step['skipped'] else ''} |")
    return "\n".join(lines) + "\n"


def write_report(demo, seconds: float) -> Path:
    """Collect, plot and write ``REPORT.md`` (and ``report.json``) into the demo folder."""
    from mmed_rag.data.phantoms import write_grid

    out = demo.out
    figures = collect(demo, seconds)
    atomic_write_text(out / "report.json", json.dumps(figures, indent=1, default=str))
    records = {m: _load(demo.data / f"test/report/{m}_test.json") for m in MODALITIES}
    write_grid(out / "data_grid.png", demo.images, records, per_modality=4, reports=True)
    plot_vqa(figures, out / "vqa_accuracy.png")
    plot_copying(figures, out / "copying.png")
    path = out / "REPORT.md"
    atomic_write_text(path, render(figures, out))
    return path
