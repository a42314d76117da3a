"""Batched vs one-by-one generation, and the pipeline's time outside ``model.generate``; prints one table.

    python benchmarks/generation.py [--quick]

1. Samples/s of greedy generation at batch 1, 4, 8 and 16 on the tiny LLaVA (~200k parameters) and on a
   ~50M-parameter LLaVA built from config, with the speed-up over batch 1 and whether every batched answer equals
   the one-by-one answer.
2. The same prompts on the ~50M LLaVA served by vLLM (``--backend openai``, every prompt in flight at once) beside
   the transformers backend's best batch: samples/s, and how many answers equal transformers'. Needs vLLM's
   environment (``make vllm-env``); the row says so when it is missing.
3. ``mmed-rag generate`` on a phantom VQA file with retrieval (tiny retriever + index): the share of wall time
   spent outside ``model.generate`` (routing, retrieval, prompt building, image loading, writing).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import yaml

from mmed_rag.chat_templates import load_chat_template
from mmed_rag.data.images import load_image
from mmed_rag.data.phantoms import PhantomConfig, make_phantoms
from mmed_rag.data.records import read_vqa
from mmed_rag.generation.generator import Generator, GeneratorConfig, load_generator
from mmed_rag.generation.prompts import build_prompt, clean_question
from mmed_rag.generation.served_layout import save_for_serving
from mmed_rag.generation.vllm_server import LocalVLLMServer
from mmed_rag.pipeline import MMedRAG
from mmed_rag.retrieval.clip import save_clip
from mmed_rag.retrieval.index import ReportIndex
from mmed_rag.testing import (
    free_port,
    save_tiny_llava,
    tiny_clip,
    tiny_image_processor,
    tiny_llava,
    tiny_llava_config,
    tiny_tokenizer,
)

ROWS: list[tuple[str, ...]] = []
VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
# About 50M parameters: a 12-layer, 512-wide Mistral and a 6-layer, 256-wide CLIP tower on 64-px images.
MEDIUM_TEXT = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
MEDIUM_VISION = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
}


def save_medium_llava(directory: Path) -> Path:
    from transformers import LlavaProcessor

    tokenizer = tiny_tokenizer()
    config = tiny_llava_config(tokenizer, vision=MEDIUM_VISION, text=MEDIUM_TEXT)
    save_for_serving(tiny_llava(0, config), directory)  # in the layout vLLM reads
    LlavaProcessor(
        image_processor=tiny_image_processor(64),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=load_chat_template("llava_med_mistral"),
    ).save_pretrained(directory)
    return directory


def batching(name: str, model_dir: Path, prompts, images, max_new_tokens: int) -> tuple[float, list[str]]:
    """Rows per batch size; returns the best samples/s and the one-by-one answers."""
    answers, rates = {}, {}
    for batch_size in (1, 4, 8, 16):
        generator = Generator.load(
            GeneratorConfig(model=str(model_dir), max_new_tokens=max_new_tokens, batch_size=batch_size)
        )
        generator.generate(prompts[:batch_size], images[:batch_size])  # warm-up
        started = time.perf_counter()
        answers[batch_size] = generator.generate(prompts, images)
        rates[batch_size] = len(prompts) / (time.perf_counter() - started)
    parameters = sum(p.numel() for p in generator.model.parameters())
    for batch_size in (1, 4, 8, 16):
        same = sum(a == b for a, b in zip(answers[batch_size], answers[1], strict=True))
        ROWS.append(
            (
                f"{name} ({parameters / 1e6:.1f}M params), batch {batch_size}",
                f"{rates[batch_size]:.1f}",
                f"{rates[batch_size] / rates[1]:.2f}x",
                f"{same}/{len(prompts)}",
            )
        )
        print("  " + " | ".join(ROWS[-1]), flush=True)
    return max(rates.values()), answers[1]


def vllm_beside_hf(work: Path, model_dir: Path, prompts, images, max_new_tokens: int, hf_rate: float, hf_answers):
    """The same prompts through a vLLM server on this machine (CPU, float32, eager), all in flight at once."""
    name = "~50M LLaVA, vLLM server (--backend openai)"
    if not VLLM_PYTHON.is_file():
        ROWS.append((name, "not run: no .venv-vllm (make vllm-env)", "", ""))
        return
    server = LocalVLLMServer(VLLM_PYTHON, model_dir, free_port(), work / "vllm")
    started = time.perf_counter()
    with server.start(timeout_s=600):
        start_s = time.perf_counter() - started
        generator = load_generator(
            GeneratorConfig(
                model=str(model_dir),
                max_new_tokens=max_new_tokens,
                batch_size=len(prompts),
                backend="openai",
                api_base=server.url,
                concurrency=len(prompts),
            )
        )
        generator.generate(prompts[:4], images[:4])  # warm-up
        started = time.perf_counter()
        answers = generator.generate(prompts, images)
        rate = len(prompts) / (time.perf_counter() - started)
    same = sum(a == b for a, b in zip(answers, hf_answers, strict=True))
    ROWS.append(
        (
            f"{name}, {len(prompts)} requests in flight (server start {start_s:.0f} s)",
            f"{rate:.1f}",
            f"{rate / hf_rate:.2f}x the best transformers batch ({hf_rate:.1f}/s)",
            f"{same}/{len(prompts)} same as transformers",
        )
    )
    print("  " + " | ".join(ROWS[-1]), flush=True)


def outside_generate(work: Path, model_dir: Path, data: Path, max_new_tokens: int) -> None:
    registry = {"modalities": {}}
    save_clip(tiny_clip(0)[0], work / "clip", "tiny-clip")
    corpus = data / "training/retriever/radiology/radiology_train.json"
    ReportIndex.build(work / "clip", corpus, "radiology", progress=False).save(work / "index")
    registry["modalities"]["radiology"] = {"retriever": str(work / "clip"), "index": str(work / "index")}
    (work / "registry.yaml").write_text(yaml.safe_dump(registry))
    rag = MMedRAG.from_config(_config(work, model_dir, data, max_new_tokens))
    inside = [0.0]
    generate = rag.generator.model.generate

    def timed_generate(*args, **kwargs):
        started = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - started

    rag.generator.model.generate = timed_generate
    started = time.perf_counter()
    summary = rag.run_file(data / "test/vqa/radiology_test.jsonl", work / "predictions.jsonl")
    total = time.perf_counter() - started
    ROWS.append(
        (
            f"generate {summary.written} phantom VQA records with retrieval, batch 8",
            f"{total:.2f} s total",
            f"{inside[0]:.2f} s in model.generate",
            f"{(total - inside[0]) / total:.1%} outside",
        )
    )
    print("  " + " | ".join(ROWS[-1]), flush=True)


def _config(work: Path, model_dir: Path, data: Path, max_new_tokens: int) -> Path:
    path = work / "generate.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": str(model_dir),
                "registry": str(work / "registry.yaml"),
                "img_root": str(data / "images"),
                "modality": "radiology",
                "fixed_k": 3,
                "max_new_tokens": max_new_tokens,
                "batch_size": 8,
            }
        )
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and tokens (about a minute)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n_prompts, max_new_tokens = (32, 8) if args.quick else (64, 16)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data = work / "data"
        make_phantoms(PhantomConfig(out=str(data), n=int(n_prompts / 0.4) + 3, size=64, modalities=("radiology",)))
        records = read_vqa(data / "test/vqa/radiology_test.jsonl").records[:n_prompts]
        prompts = [build_prompt("vqa", "radiology", clean_question(r.question), []) for r in records]
        images = [[load_image(data / "images", r.image)] for r in records]
        batching("tiny LLaVA", save_tiny_llava(work / "tiny"), prompts, images, max_new_tokens)
        medium = save_medium_llava(work / "medium")
        hf_rate, hf_answers = batching("~50M LLaVA", medium, prompts, images, max_new_tokens)
        vllm_beside_hf(work, medium, prompts, images, max_new_tokens, hf_rate, hf_answers)
        outside_generate(work, medium, data, max_new_tokens)
    print()
    print("| measure | samples/s (or time) | speed-up (or time) | same answers as batch 1 (or share) |")
    print("|---|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
