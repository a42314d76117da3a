"""Time and peak memory of one RAG-PT DPO training step, against a plain SFT step and a separate reference copy.

    python benchmarks/dpo_step.py [--size medium|tiny] [--pairs 4] [--warmup 1] [--steps 5]
                                  [--lora-r 128] [--lora-alpha 256] [--gradient-checkpointing]
                                  [--vocab-size 32000] [--json PATH]

The issue's goals for our DPO step: one fused forward over chosen + rejected, peak memory <= 1.15x a plain SFT
step on the same batch, tokens/s reported. The model is a LLaVA built from config (``--size medium``: about 50M
parameters, ~4 minutes on 2 idle cores; ``tiny``: the 200k test model, a smoke check of under a minute) with
MMed-RAG's LoRA (r 128, alpha 256 on the language model's projections, the projector as a trained
``modules_to_save`` copy) and the trainer's AdamW. The batch is ``--pairs`` (B) preference pairs shaped like
MMed-RAG's (an image, three retrieved reports of ~150 tokens in all, a question, ~30-token answers; every other pair
has its rejected answer on a noise image), collated once by
:class:`~mmed_rag.alignment.collator.RAGPreferenceCollator`, so every variant trains on exactly what training sees.
A step is what the Trainer does: loss, backward, clipping to ``max_grad_norm``, AdamW step, zero grads. The
variants differ only in the loss:

- ``sft``: the same LoRA model and optimizer, one forward + backward over the chosen half only (B rows, trailing
  padding trimmed as an SFT collator would), labels = the chosen answer tokens (prompt masked), the model's own
  cross-entropy. The floor a preference step is compared with.
- ``ours``: :class:`~mmed_rag.alignment.dpo.MMedRAGDPOTrainer`'s ``compute_loss`` (what its ``training_step``
  calls): a policy forward over the 2B rows ``[chosen..., rejected...]`` with grad, then a forward over the same
  rows without grad and with the adapter disabled as the reference. A hook on the language model records every
  forward (rows, grad on or off), so the table shows the fusion instead of claiming it.
- ``dpo_separate_ref``: the same trainer given ``ref_model`` = a frozen deep copy of the base model, as trl does
  without peft and as the original MMed-RAG code loaded ``model_ref``. The same loss, and the same losses as
  ``ours`` step by step (the disabled adapter *is* the base model); only where the reference lives differs.

Each variant runs in its own process. Times: median and best of ``--steps`` steps after ``--warmup`` (the first
step allocates the AdamW state); tokens/s counts the non-padding tokens of the rows a step trains on (2B rows for
DPO, B for SFT), once each, over the median. Memory, two views:

- tensors (exact, what a GPU's ``max_memory_allocated`` measures): ``held`` = the distinct tensor storages alive
  between steps (weights, LoRA, AdamW state, a reference copy, the batch); ``step allocations peak`` = the most
  bytes one more step holds at once on top of that, from the profiler's memory events; ``tensor peak`` = both.
  The DPO variants project the answer tokens only onto the vocabulary
  (:mod:`mmed_rag.alignment.answer_logprobs`); SFT's loss, the model's own, projects every position. That gap
  grows with the vocabulary: ``--vocab-size 32000`` gives the head LLaVA-Med's width (Mistral's vocabulary).
- RSS (the OS's view, allocator overhead included): ``baseline`` once the model and the batch exist, what every
  variant shares (freed heap trimmed first, so later allocations show); ``step peak`` = the RSS high-water mark
  over the timed steps (reset through ``/proc/self/clear_refs`` before them); ``increase`` = step peak - baseline;
  ``process peak`` = ``ru_maxrss`` over the whole process, imports and model building included.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import itertools
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from transformers import LlavaProcessor

from mmed_rag.alignment.collator import RAGPreferenceCollator
from mmed_rag.alignment.dataset import user_text
from mmed_rag.alignment.dpo import lora_config
from mmed_rag.alignment.dpo_config import MMedRAGDPOConfig
from mmed_rag.alignment.trainer import MMedRAGDPOTrainer
from mmed_rag.chat_templates import LLAVA_MED_MISTRAL, load_chat_template
from mmed_rag.generation.prompts import build_prompt
from mmed_rag.testing import tiny_image_processor, tiny_llava, tiny_llava_config, tiny_processor, tiny_tokenizer

VARIANTS = ("sft", "ours", "dpo_separate_ref")
MEMORY_GOAL = 1.15  # the goal: DPO step peak <= 1.15x the SFT step's

# --size medium: about 50M parameters, a 14-layer, 512-wide Mistral and a 6-layer, 256-wide CLIP tower on 64-px
# images (64 image tokens per row). --size tiny: mmed_rag.testing's shapes (32-px images, 16 image tokens).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"vision": None, "text": None},
    "medium": {
        "vision": {
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
        },
        "text": {
            "hidden_size": 512,
            "intermediate_size": 1536,
            "num_hidden_layers": 14,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
        },
    },
}

# Radiology wording from the tiny tokenizer's corpus, so no word becomes <unk>.
REPORTS = (
    "Frontal and lateral views of the chest. The heart is normal in size. The mediastinum is unremarkable. "
    "The lungs are clear. There is no focal consolidation, pleural effusion, or pneumothorax. Osseous structures "
    "are intact. No acute cardiopulmonary abnormality.",
    "PA and lateral chest radiographs. Heart size is mildly enlarged. There is a small right pleural effusion. "
    "Mild atelectasis at the lung bases. Mild pulmonary vascular congestion. Degenerative changes of the thoracic "
    "spine. No displaced rib fracture.",
    "AP portable chest radiograph. The cardiomediastinal silhouette is within normal limits. Patchy opacity in the "
    "right middle lobe concerning for pneumonia. The thoracic aorta is tortuous and calcified. Support devices are "
    "unchanged. Soft tissues are unremarkable.",
)
QUESTIONS = ("Is there a pleural effusion?", "Are the lungs clear?", "Is there a pneumothorax?")
CHOSEN = (
    "Yes, there is a small right pleural effusion. Mild atelectasis at the lung bases. The heart is normal in size. "
    "No pneumothorax."
)
REJECTED = (
    "No, there is no pleural effusion. The lungs are clear bilaterally without focal airspace disease. The heart is "
    "enlarged, consistent with cardiomegaly."
)


# -- model, processor, batch -----------------------------------------------------------------------------------


def build_processor(size: str):
    """The tiny processor, or the same tokenizer with an image processor at the medium model's image size."""
    vision = SIZES[size]["vision"]
    if vision is None:
        return tiny_processor()
    return LlavaProcessor(
        image_processor=tiny_image_processor(vision["image_size"]),
        tokenizer=tiny_tokenizer(),
        patch_size=vision["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=load_chat_template(LLAVA_MED_MISTRAL),
    )


def build_model(size: str, processor, vocab_size: int | None = None):
    """A seeded LLaVA of ``size`` in float32, built from config: every variant starts from the same weights.

    ``vocab_size`` widens the embedding and the LM head beyond the tokenizer's 720 words (the rows past them are
    never used as input), to give the head the cost it has in LLaVA-Med (Mistral's 32,000)."""
    shape = SIZES[size]
    config = tiny_llava_config(processor.tokenizer, vision=shape["vision"], text=shape["text"])
    if vocab_size is not None:
        if vocab_size < len(processor.tokenizer):
            raise SystemExit(f"--vocab-size {vocab_size} is smaller than the tokenizer ({len(processor.tokenizer)})")
        config.text_config.vocab_size = vocab_size
    return tiny_llava(0, config)


def preference_rows(pairs: int, image_size: int) -> list[dict[str, Any]]:
    """RAG-PT rows as :mod:`mmed_rag.alignment.dataset` makes them; every other pair is ``rejected_noised``."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(pairs):
        pixels = rng.integers(0, 256, (image_size, image_size), dtype=np.uint8)
        prompt = build_prompt("vqa", "radiology", QUESTIONS[index % len(QUESTIONS)], REPORTS)
        rows.append(
            {
                "prompt": [{"role": "user", "content": user_text(prompt)}],
                "chosen": [{"role": "assistant", "content": CHOSEN}],
                "rejected": [{"role": "assistant", "content": REJECTED}],
                "images": [Image.fromarray(pixels).convert("RGB")],
                "rejected_noised": index % 2,
                "chosen_noised": 0,
                "pair_index": index,
            }
        )
    return rows


def collate(processor, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The training batch: rows ``[chosen_0..chosen_B-1, rejected_0..rejected_B-1]``, the rejected-side images."""
    batch = RAGPreferenceCollator(processor=processor, max_length=None)(rows)
    return {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}


def chosen_half(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SFT batch: the chosen rows, padding columns no chosen row uses trimmed, labels on the answer only."""
    rows = batch["input_ids"].shape[0] // 2
    width = int(batch["attention_mask"][:rows].sum(dim=0).nonzero().max()) + 1
    half = {key: batch[key][:rows, :width] for key in ("input_ids", "attention_mask")}
    half["pixel_values"] = batch["pixel_values"][:rows]  # one image per pair
    half["labels"] = half["input_ids"].masked_fill(batch["completion_mask"][:rows, :width] == 0, -100)
    return half


def make_trainer(model, processor, rows: list[dict[str, Any]], args: argparse.Namespace, ref_model=None):
    """MMedRAGDPOTrainer with MMed-RAG's LoRA; it wraps ``model`` in place and owns the optimizer of every variant."""
    config = MMedRAGDPOConfig(
        output_dir=args.work_dir,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        per_device_train_batch_size=args.pairs,
        gradient_checkpointing=args.gradient_checkpointing,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    trainer = MMedRAGDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        peft_config=lora_config(config),
    )
    if config.activation_checkpointing:  # Trainer.train() would turn it on; these steps run without train()
        trainer.model.activation_checkpointing_enable(config.activation_checkpointing_kwargs)
    trainer.create_optimizer()
    return trainer


# -- measuring -------------------------------------------------------------------------------------------------


def rss_kib(field: str = "VmRSS") -> int:
    """A line of /proc/self/status in KiB: VmRSS (now) or VmHWM (high-water mark since start or last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def release_free_memory() -> None:
    """Hand glibc's freed heap back to the OS, so RSS is live memory: a later allocation (a reference copy, say)
    shows up as an increase instead of silently refilling holes left by building the model."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> None:
    """Restart the RSS high-water mark at the current RSS (Linux >= 4.0), so the next peak is the steps' alone."""
    Path("/proc/self/clear_refs").write_text("5")


def _tensors(holder) -> Iterator[torch.Tensor]:
    if isinstance(holder, torch.nn.Module):
        yield from holder.parameters()
        yield from holder.buffers()
    elif isinstance(holder, torch.optim.Optimizer):
        for state in holder.state.values():
            yield from (value for value in state.values() if isinstance(value, torch.Tensor))
    else:
        yield from holder.values()


def tensor_bytes(*holders) -> int:
    """Bytes of the distinct tensor storages in modules, optimizers and dicts of tensors (shared storage once)."""
    storages = {}
    for holder in holders:
        for tensor in _tensors(holder):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def allocation_peak(function) -> int:
    """The most tensor bytes ``function()`` held allocated at once.

    From the profiler's CPU memory events, so exact and free of allocator fragmentation: what
    ``torch.cuda.max_memory_allocated`` would add on a GPU over the tensors that already existed.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    # kineto_results: the raw events the profiler's own tables are built from, memory events included
    events = sorted(profiler.profiler.kineto_results.events(), key=lambda event: event.start_ns())
    changes = [event.nbytes() for event in events if event.name() == "[memory]"]
    return max(itertools.accumulate(changes, initial=0))


class ForwardLog:
    """Every language-model forward: (which model, rows in the batch, whether grad was on)."""

    def __init__(self, models: dict[str, torch.nn.Module]) -> None:
        self.calls: list[tuple[str, int, bool]] = []
        for tag, model in models.items():
            language_model = next(m for n, m in model.named_modules() if n.endswith("model.language_model"))
            language_model.register_forward_pre_hook(self._hook(tag), with_kwargs=True)

    def _hook(self, tag: str):
        def record(module, args, kwargs):
            embeds = kwargs.get("inputs_embeds")
            rows = embeds.shape[0] if embeds is not None else kwargs["input_ids"].shape[0]
            self.calls.append((tag, rows, torch.is_grad_enabled()))

        return record

    def describe(self, steps: int) -> str:
        """The forwards of one step, e.g. ``policy 8 rows grad + policy 8 rows no-grad``; all steps must agree."""
        per_step = len(self.calls) // steps
        first = self.calls[:per_step]
        if per_step == 0 or self.calls != first * steps:
            return f"irregular: {self.calls}"
        return " + ".join(f"{tag} {rows} rows {'grad' if grad else 'no-grad'}" for tag, rows, grad in first)


def loss_function(variant: str, trainer, batch: dict[str, torch.Tensor]):
    """The variant's loss of the batch (see the module doc); everything else in a step is shared."""
    model = trainer.model
    if variant == "sft":
        half = chosen_half(batch)
        return lambda: model(**half, use_cache=False).loss
    return lambda: trainer.compute_loss(model, batch)


def train_step(trainer, loss_fn) -> float:
    """One step as the Trainer takes it: loss, backward, clip to ``max_grad_norm``, AdamW step, zero grads."""
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(
        [p for p in trainer.model.parameters() if p.requires_grad], trainer.args.max_grad_norm
    )
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def run_steps(trainer, loss_fn, count: int) -> tuple[list[float], list[float]]:
    """``count`` training steps; (seconds, loss) of each."""
    seconds, losses = [], []
    for _ in range(count):
        started = time.perf_counter()
        losses.append(train_step(trainer, loss_fn))
        seconds.append(time.perf_counter() - started)
    return seconds, losses


def measure(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One variant, in this process: build, take the baseline, set up the variant, warm up, time, profile memory."""
    torch.manual_seed(0)
    processor = build_processor(args.size)
    model = build_model(args.size, processor, args.vocab_size)
    parameters = sum(p.numel() for p in model.parameters())
    rows = preference_rows(args.pairs, processor.image_processor.crop_size["height"])
    batch = collate(processor, rows)
    release_free_memory()
    baseline = rss_kib()
    ref_model = copy.deepcopy(model).requires_grad_(False) if variant == "dpo_separate_ref" else None
    trainer = make_trainer(model, processor, rows, args, ref_model)
    trainer.model.train()
    forwards = ForwardLog({"policy": trainer.model} | ({"reference": ref_model} if ref_model is not None else {}))
    trained = chosen_half(batch) if variant == "sft" else batch
    loss_fn = loss_function(variant, trainer, batch)
    run_steps(trainer, loss_fn, args.warmup)  # the first step allocates the optimizer state
    process_peak = max(rss_kib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # the reset clears both
    reset_peak()
    forwards.calls.clear()
    seconds, losses = run_steps(trainer, loss_fn, args.steps)
    step_peak = rss_kib("VmHWM")
    forwards_per_step = forwards.describe(args.steps)
    held = tensor_bytes(
        *(holder for holder in (trainer.model, ref_model, trainer.optimizer, batch) if holder is not None)
    )
    allocated = allocation_peak(lambda: train_step(trainer, loss_fn))
    median = statistics.median(seconds)
    tokens = int(trained["attention_mask"].sum())
    mib = 1 / 1024**2
    return {
        "variant": variant,
        "parameters": parameters,
        "vocab_size": model.config.text_config.vocab_size,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "dpo_batch_shape": list(batch["input_ids"].shape),
        "trained_rows": int(trained["input_ids"].shape[0]),
        "trained_tokens": tokens,
        "answer_tokens": int(batch["completion_mask"][: int(trained["input_ids"].shape[0])].sum()),
        "seconds": seconds,
        "median_s": median,
        "best_s": min(seconds),
        "tokens_per_s": tokens / median,
        "forwards_per_step": forwards_per_step,
        "losses": losses,
        "rss_baseline_mib": baseline / 1024,
        "rss_step_peak_mib": step_peak / 1024,
        "rss_increase_mib": (step_peak - baseline) / 1024,
        "rss_process_peak_mib": max(process_peak, step_peak) / 1024,
        "tensors_held_mib": held * mib,
        "step_allocation_peak_mib": allocated * mib,
        "tensor_peak_mib": (held + allocated) * mib,
    }


# -- driver ----------------------------------------------------------------------------------------------------


def run_variant(variant: str, argv: list[str], work: Path) -> dict[str, Any]:
    """Measure ``variant`` in a fresh Python process with the same options (its own peak RSS); read its result.

    The worker's stderr (library and profiler notices) is shown only when it fails.
    """
    result = work / f"{variant}.json"
    command = [sys.executable, __file__, *argv, "--worker", variant, "--result", str(result)]
    finished = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    if finished.returncode:
        sys.stderr.write(finished.stderr)
        raise SystemExit(f"{variant}: worker failed with exit status {finished.returncode}")
    return json.loads(result.read_text())


def _ratio(results: dict[str, dict[str, Any]], variant: str, key: str) -> str:
    return f"{results[variant][key] / results['sft'][key]:.2f}x"


def time_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown: step time (median and best), its ratio to ``sft``, tokens/s, the forwards a step runs."""
    lines = [
        "| variant | rows trained | tokens/step | step s, median | best | x sft (median) | tokens/s "
        "| language-model forwards per step | last loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, r in results.items():
        lines.append(
            f"| {variant} | {r['trained_rows']} | {r['trained_tokens']} | {r['median_s']:.3f} | {r['best_s']:.3f} "
            f"| {_ratio(results, variant, 'median_s')} | {r['tokens_per_s']:.0f} | {r['forwards_per_step']} "
            f"| {r['losses'][-1]:.4f} |"
        )
    return lines


def memory_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown: tensor memory (exact) and RSS (the OS's view), each next to its ratio to ``sft``."""
    lines = [
        "| variant | tensors held MiB | step allocations peak MiB | x sft | tensor peak MiB | x sft "
        "| RSS step peak MiB | x sft | RSS increase over baseline MiB | x sft | RSS process peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, r in results.items():
        lines.append(
            f"| {variant} | {r['tensors_held_mib']:.0f} | {r['step_allocation_peak_mib']:.0f} "
            f"| {_ratio(results, variant, 'step_allocation_peak_mib')} | {r['tensor_peak_mib']:.0f} "
            f"| {_ratio(results, variant, 'tensor_peak_mib')} | {r['rss_step_peak_mib']:.0f} "
            f"| {_ratio(results, variant, 'rss_step_peak_mib')} | {r['rss_increase_mib']:.0f} "
            f"| {_ratio(results, variant, 'rss_increase_mib')} | {r['rss_process_peak_mib']:.0f} |"
        )
    return lines


def verdict(results: dict[str, dict[str, Any]]) -> list[str]:
    """Plain sentences on the issue's goals (one fused forward, memory within 1.15x of SFT) and what explains them."""
    ours, sft, separate = results["ours"], results["sft"], results["dpo_separate_ref"]
    rows = ours["trained_rows"]
    fused = ours["forwards_per_step"] == f"policy {rows} rows grad + policy {rows} rows no-grad"
    ratios = {
        "tensor peak": ours["tensor_peak_mib"] / sft["tensor_peak_mib"],
        "RSS step peak": ours["rss_step_peak_mib"] / sft["rss_step_peak_mib"],
        "RSS increase over baseline": ours["rss_increase_mib"] / sft["rss_increase_mib"],
    }
    met = ", ".join(
        f"{name} {ratio:.2f}x ({'met' if ratio <= MEMORY_GOAL else 'NOT met'})" for name, ratio in ratios.items()
    )
    same_losses = all(abs(a - b) < 1e-4 for a, b in zip(ours["losses"], separate["losses"], strict=True))
    return [
        f"- One fused policy forward over chosen + rejected: {'yes' if fused else 'NO'} ({ours['forwards_per_step']}).",
        f"- Memory goal, DPO step <= {MEMORY_GOAL}x the SFT step: {met}.",
        f"- What one more step allocates: {sft['step_allocation_peak_mib']:.0f} MiB for SFT's "
        f"{sft['trained_rows']} rows, {ours['step_allocation_peak_mib']:.0f} MiB for DPO's {rows} (chosen + "
        f"rejected). DPO keeps the activations of twice the rows; the reference forward runs without grad and keeps "
        f"none. SFT's loss projects all {sft['trained_tokens']} positions of its rows onto the "
        f"{ours['vocab_size']}-word vocabulary, DPO's head only the {ours['answer_tokens']} answer tokens of its rows. "
        f"Which side wins depends on vocabulary x prompt length against activations (gradient checkpointing, the "
        f"original's setting, shrinks the activations); weights and AdamW state are shared, so a 7B model's ratio "
        f"sits nearer 1x.",
        f"- A separate reference copy holds {separate['tensors_held_mib'] - ours['tensors_held_mib']:+.0f} MiB more "
        f"tensors (tensor peak {separate['tensor_peak_mib'] / ours['tensor_peak_mib']:.2f}x ours) and takes "
        f"{separate['median_s'] / ours['median_s']:.2f}x the step time; the same losses as ours: "
        f"{'yes' if same_losses else 'NO'}.",
    ]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium", help="medium: ~50M parameters")
    parser.add_argument("--pairs", type=_positive, default=4, help="preference pairs per step (B)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=_positive, default=5, help="timed steps (median and best reported)")
    parser.add_argument("--lora-r", type=int, default=128, help="LoRA rank (MMed-RAG: 128)")
    parser.add_argument("--lora-alpha", type=int, default=256, help="LoRA alpha (MMed-RAG: 256)")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward (MMed-RAG's setting)"
    )
    parser.add_argument(
        "--vocab-size", type=_positive, help="LM head width (default: the tokenizer's 720; LLaVA-Med: 32000)"
    )
    parser.add_argument("--json", type=Path, help="also write every variant's measurements here")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as work:
        args.work_dir = work
        if args.worker:
            args.result.write_text(json.dumps(measure(args.worker, args)))
            return
        results = {}
        for variant in VARIANTS:
            results[variant] = run_variant(variant, argv, Path(work))
            print(f"  {variant}: {results[variant]['median_s']:.3f} s/step", flush=True)
    first = results["sft"]
    checkpointing = "on" if args.gradient_checkpointing else "off"
    print(
        f"\n{args.size} LLaVA, {first['parameters'] / 1e6:.1f}M parameters, vocabulary {first['vocab_size']}; "
        f"LoRA r {args.lora_r}, alpha "
        f"{args.lora_alpha} + projector: {first['trainable_parameters'] / 1e6:.1f}M trainable; {args.pairs} pairs, "
        f"DPO batch {tuple(first['dpo_batch_shape'])}; gradient checkpointing {checkpointing}; "
        f"{args.steps} timed steps after {args.warmup} warm-up; {torch.get_num_threads()} torch threads\n"
    )
    print("\n".join(time_table(results)))
    print()
    print("\n".join(memory_table(results)))
    print()
    print("\n".join(verdict(results)))
    if args.json:
        options = {
            key: value for key, value in vars(args).items() if key not in ("worker", "result", "work_dir", "json")
        }
        args.json.write_text(json.dumps({"options": options, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
