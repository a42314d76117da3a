"""The demo's stand-in Med-LVLM: a small LLaVA built from config, its vision encoder pretrained before SFT.

A real Med-LVLM starts from a pretrained vision encoder (LLaVA-Med's is CLIP's) and keeps it frozen while the
language side learns to talk about images. The stand-in's encoder is pretrained here, on the training split's
finding labels (a multi-label head on the patch features LLaVA passes on, discarded afterwards), for the same
reason: trained from scratch through the language model alone, it never learned to read the phantoms (measured:
test AUC 0.52 without reports after the whole SFT, while a probe on the same encoder reaches 0.84-1.0 per finding
after seconds of training). The held-out AUC of the pretrained encoder is written beside the weights, so REPORT.md
can say how much of the image a perfect reader of these features could use.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Collection, Sequence
from pathlib import Path

from mmed_rag.atomic import atomic_write_text, publish_directory

logger = logging.getLogger(__name__)

#: The stand-in's shapes: 64-px images in 8-px patches (64 image tokens), a 3-layer text model; ~1M parameters.
#: Text head_dim 32 (128 / 4 heads).
STANDIN_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 64,
    "patch_size": 8,
}
STANDIN_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
#: Written into the pretrained model's directory: the finding labels, the epochs, the held-out AUC per finding.
PRETRAINING_FILE = "vision_pretraining.json"


#: Images under an image root, each with the set of its labels.
LabelledFilms = Sequence[tuple[str, Collection[str]]]


def phantom_labels(records_files: Sequence[Path]) -> LabelledFilms:
    """The images of phantom report records with their ``modality:finding`` labels."""
    from mmed_rag.data.phantoms import image_of

    return [
        (image_of(record), {f"{record['modality']}:{finding}" for finding in record["findings"]})
        for path in records_files
        for record in json.loads(Path(path).read_text(encoding="utf-8"))
    ]


def phantom_label_names() -> list[str]:
    """Every phantom finding as a ``modality:finding`` label, in the generator's order."""
    from mmed_rag.data.phantoms import FINDINGS

    return [f"{modality}:{finding}" for modality, findings in FINDINGS.items() for finding in findings]


def _labelled(films: LabelledFilms, image_root: Path, processor, labels: Sequence[str]):
    """Pixel values and multi-label targets (one column per label) of labelled images."""
    import torch

    from mmed_rag.data.images import load_image

    images = [load_image(image_root, image) for image, _ in films]
    targets = [[float(label in present) for label in labels] for _, present in films]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(targets)


def pretrain_vision(
    base: str | Path,
    train: LabelledFilms,
    val: LabelledFilms,
    labels: Sequence[str],
    image_root: str | Path,
    out: str | Path,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
) -> dict:
    """Train ``base``'s vision tower (up to LLaVA's feature layer) to tell ``labels`` apart on the ``train``
    images; save the whole model with the trained tower to ``out``. Returns the held-out AUC per label (``val``)."""
    import torch
    from sklearn.metrics import roc_auc_score
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmed_rag.generation.served_layout import save_for_serving

    torch.manual_seed(seed)
    processor = AutoProcessor.from_pretrained(base)
    model = LlavaForConditionalGeneration.from_pretrained(base)
    labels = list(labels)
    train_pixels, train_targets = _labelled(train, Path(image_root), processor, labels)
    val_pixels, val_targets = _labelled(val, Path(image_root), processor, labels)
    tower, layer = model.model.vision_tower, model.config.vision_feature_layer
    head = torch.nn.Linear(tower.config.hidden_size, len(labels))

    def logits(pixels):
        # The patch features LLaVA's projector receives (the class token dropped), averaged over patches.
        return head(tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:].mean(1))

    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(train_pixels), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits(train_pixels[batch]), train_targets[batch]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(order))
    with torch.no_grad():
        scores = torch.sigmoid(logits(val_pixels)).numpy()
    auc = {
        label: float(roc_auc_score(val_targets[:, column].numpy(), scores[:, column]))
        for column, label in enumerate(labels)
        if 0 < val_targets[:, column].sum() < len(val_targets)  # a finding absent (or everywhere) has no AUC
    }
    summary = {"labels": labels, "epochs": epochs, "train_loss": losses, "val_auc": auc}
    out = Path(out)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    save_for_serving(model, staging)
    processor.save_pretrained(staging)
    atomic_write_text(staging / PRETRAINING_FILE, json.dumps(summary, indent=1))
    publish_directory(staging, out)
    logger.info("vision encoder pretrained for %d epochs: held-out AUC per finding %s", epochs, auc)
    return summary
