"""``mmed-rag demo``: the smallest real end-to-end path that exists today, on generated data, offline.

Until the retrieval, generation and preference-tuning stages land, the demo runs what does work, for real, and
reports what it measured (nothing here is a canned number):

1. draw a phantom data set in the release layout (``make-phantoms``);
2. validate every file it wrote, images included (``validate-data``);
3. draw a contact sheet of the phantoms and an example of MMed-RAG's noised image;
4. probe the pixels: a linear classifier learns modality and findings (accuracy next to the majority rate);
5. build the tiny LLaVA and tiny CLIP, save them, reload them from disk through the same loaders a real
   checkpoint uses, and run one phantom VQA prompt through the reloaded LLaVA (logits compared to the original).

Everything it wrote, and a ``demo_summary.json`` of the numbers, lands in ``--out``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmed_rag.atomic import atomic_path, atomic_write_text
from mmed_rag.config import config_to_dict, save_config
from mmed_rag.outputs import claim_outputs

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Arguments of ``mmed-rag demo``."""

    out: str = field(default="demo-output", metadata={"help": "directory for everything the demo writes"})
    n: int = field(default=600, metadata={"help": "phantom images over all modalities"})
    size: int = field(default=64, metadata={"help": "phantom image side in pixels"})
    seed: int = field(default=0, metadata={"help": "seed for data and models"})


def _side_by_side(original_path: Path, noised_path: Path, out_png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mmed_rag.data.images import open_image

    figure = Figure(figsize=(4, 2.2), dpi=100)
    FigureCanvasAgg(figure)
    for axis, path, title in zip(figure.subplots(1, 2), (original_path, noised_path), ("image", "noised"), strict=True):
        axis.imshow(open_image(path), interpolation="nearest")
        axis.set_title(title, fontsize=8)
        axis.set_axis_off()
    figure.tight_layout()
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png")


def _tiny_models(out: Path, phantom_dir: Path, seed: int) -> dict:
    """Save and reload the tiny LLaVA and CLIP; run one phantom VQA prompt through the reloaded LLaVA."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmed_rag.data.images import load_image
    from mmed_rag.data.records import read_vqa
    from mmed_rag.retrieval.clip import load_clip, save_clip
    from mmed_rag.testing import save_tiny_llava, tiny_clip, tiny_llava, tiny_llava_config, tiny_processor

    llava_dir = save_tiny_llava(out / "tiny-llava", seed=seed)
    model = AutoModelForImageTextToText.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    question = read_vqa(phantom_dir / "test/vqa/radiology_test.jsonl").records[0]
    image = load_image(phantom_dir / "images", question.image)
    messages = [{"role": "user", "content": question.text}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    reference = tiny_llava(seed, tiny_llava_config(tiny_processor().tokenizer))
    with torch.no_grad():
        logits = model(**inputs).logits
        difference = (logits - reference(**inputs).logits).abs().max().item()
    clip_model, _, preprocess, _ = tiny_clip(seed)
    clip_dir = save_clip(clip_model, out / "tiny-clip", "tiny-clip")
    reloaded_clip, *_ = load_clip(clip_dir)
    pixels = preprocess(image).unsqueeze(0)
    with torch.no_grad():
        clip_difference = (clip_model.encode_image(pixels) - reloaded_clip.encode_image(pixels)).abs().max().item()
    return {
        "llava_dir": str(llava_dir),
        "llava_parameters": sum(p.numel() for p in model.parameters()),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "image_tokens": int((inputs["input_ids"] == model.config.image_token_index).sum()),
        "llava_reload_max_logit_difference": difference,
        "clip_dir": str(clip_dir),
        "clip_parameters": sum(p.numel() for p in reloaded_clip.parameters()),
        "clip_reload_max_embedding_difference": clip_difference,
    }


def run_demo(config: DemoConfig) -> int:
    """Run the demo; return a process exit code (non-zero when a step finds a problem)."""
    with claim_outputs("demo", directories=[config.out]):
        return _run_demo(config)


def _run_demo(config: DemoConfig) -> int:
    from mmed_rag.data.images import noised_image, resolve_image_path
    from mmed_rag.data.phantom_probe import probe_phantoms
    from mmed_rag.data.phantoms import PhantomConfig, make_phantoms, write_grid
    from mmed_rag.data.records import read_report_test
    from mmed_rag.data.validate import validate_data

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out)
    summary: dict = {"config": config_to_dict(config)}
    phantom_dir = out / "phantoms"

    started = time.perf_counter()
    manifest = make_phantoms(PhantomConfig(out=str(phantom_dir), n=config.n, size=config.size, seed=config.seed))
    summary["phantoms"] = {"seconds": round(time.perf_counter() - started, 2), "counts": manifest["counts"]}
    print(
        f"[1/5] phantoms: {config.n} images of {config.size} px in {summary['phantoms']['seconds']} s -> {phantom_dir}"
    )

    files = sorted(str(p) for p in phantom_dir.glob("t*/**/*.json*"))
    report = validate_data(files, image_root=str(phantom_dir / "images"))
    print("[2/5] validate-data on every file written:")
    print("\n".join("      " + line for line in report.render().splitlines()))
    summary["validation_ok"] = report.ok
    if not report.ok:
        return 1

    test_records = {
        m: read_report_test(phantom_dir / f"test/report/{m}_test.json").records for m in manifest["findings"]
    }
    grid = write_grid(
        out / "phantom_grid.png",
        phantom_dir / "images",
        {modality: [record.to_dict() for record in records] for modality, records in test_records.items()},
    )
    first = test_records["radiology"][0]
    original = resolve_image_path(phantom_dir / "images", first.images[0])
    noised = out / "noised_example.png"
    with atomic_path(noised) as tmp:
        noised_image((config.size, config.size), seed=config.seed).save(tmp, format="PNG")
    _side_by_side(original, noised, out / "noised_side_by_side.png")
    print(f"[3/5] pictures: {grid}, {out / 'noised_side_by_side.png'}")

    scores = probe_phantoms(phantom_dir)
    summary["pixel_probe"] = [score.__dict__ for score in scores]
    print("[4/5] pixel probe (logistic regression on 16x16 pixels + colour histograms; train split -> test split):")
    print(f"      {'task':<28} {'accuracy':>8} {'majority':>8} {'n test':>6}")
    for score in scores:
        print(f"      {score.task:<28} {score.accuracy:>8.3f} {score.majority:>8.3f} {score.n_test:>6}")

    models = _tiny_models(out, phantom_dir, config.seed)
    summary["tiny_models"] = models
    print(
        f"[5/5] tiny LLaVA ({models['llava_parameters']:,} parameters) saved and reloaded from {models['llava_dir']}: "
        f"one phantom VQA prompt = {models['prompt_tokens']} tokens ({models['image_tokens']} image tokens), "
        f"max logit difference after reload {models['llava_reload_max_logit_difference']:.1e}; tiny CLIP "
        f"({models['clip_parameters']:,} parameters) max embedding difference after reload "
        f"{models['clip_reload_max_embedding_difference']:.1e}"
    )
    atomic_write_text(out / "demo_summary.json", json.dumps(summary, indent=2))
    print(f"summary: {out / 'demo_summary.json'}")
    return 0
