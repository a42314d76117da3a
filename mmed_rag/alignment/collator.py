"""The DPO batch for RAG-PT pairs: each side of a pair sees its own image.

trl's :class:`~trl.trainer.dpo_trainer.DataCollatorForVisionPreference` gives the chosen and the rejected rows the
same images. MMed-RAG's cross-modality pairs need the rejected answer scored on a noise image (``rejected_noised``),
or the chosen one (``chosen_noised``). The text is the same whichever image a side gets, so the subclass collates
as trl does and then replaces the rejected half of ``pixel_values``: trl's loss runs one forward over
``[chosen_0 .. chosen_B-1, rejected_0 .. rejected_B-1]`` and splits it with ``chunk(2)``, so rows ``B..2B-1`` are
what the rejected answers are scored with, by the policy and by the reference alike.

The noise image is MMed-RAG's (:func:`~mmed_rag.data.images.noised_image`, pure clipped Gaussian noise of the real
image's size), seeded by ``(noise_seed, pair_index, side)``: the same pair gets the same noise in every epoch and
every rerun. The original drew it from NumPy's global generator, a new one each time.

It also puts back the BOS token: trl tokenises with ``add_special_tokens=False`` because chat templates usually
write BOS themselves, but LLaVA-Med's template leaves it to the tokenizer, so without the fix every training row
would start without the ``<s>`` that every inference prompt starts with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from mmed_rag.data.images import noised_image, open_image

_SIDES = {"chosen": 0, "rejected": 1}


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every encoded text with BOS (Llama, Mistral: yes), as inference inputs do."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


# What a prepended BOS column holds in each field a trl collator may return (None: the BOS id itself).
_BOS_COLUMN = {
    "input_ids": None,
    "attention_mask": 1,
    "completion_mask": 0,
    "labels": -100,
    "token_type_ids": 0,
    "mm_token_type_ids": 0,
}


def with_bos(batch: dict[str, Any], tokenizer, max_length: int | None = None) -> dict[str, Any]:
    """Prepend BOS when the tokenizer adds one at inference and the rows do not start with it.

    For trl's collators (DPO and SFT alike), which flush rows left, so column 0 is every row's first token. The
    BOS carries no loss (label -100, completion mask 0).
    """
    bos = tokenizer.bos_token_id
    if not adds_bos(tokenizer):
        return batch
    input_ids = batch["input_ids"]
    if bool((input_ids[:, 0] == bos).all()):
        return batch
    rows = input_ids.shape[0]
    for key, value in _BOS_COLUMN.items():
        if key in batch:
            column = torch.full((rows, 1), bos if value is None else value, dtype=batch[key].dtype)
            batch[key] = torch.cat([column, batch[key]], dim=1)
            if max_length is not None:
                batch[key] = batch[key][:, :max_length]
    return batch


def pair_noise(size: tuple[int, int], noise_seed: int, pair_index: int, side: str, image_index: int = 0) -> Image.Image:
    """The noise image of one side of one pair: the same for the same arguments, independent across pairs."""
    sequence = np.random.SeedSequence([noise_seed, pair_index, _SIDES[side], image_index])
    return noised_image(size, np.random.default_rng(sequence))


@dataclass
class RAGPreferenceCollator(DataCollatorForVisionPreference):
    """trl's vision preference collator with a per-side image and the BOS fix (see the module doc).

    Examples carry ``images`` (paths or PIL images, one per ``<image>`` marker), ``rejected_noised``,
    ``chosen_noised`` and ``pair_index`` besides trl's ``prompt``/``chosen``/``rejected``.

    ``chosen_noised_mode``: what a ``chosen_noised: 1`` pair shows. ``"chosen"`` (default): the chosen answer is
    scored on the noise image and the rejected answer on the real one. ``"both"``: both sides on the same noise
    image, as the original training code did (its ``chosen_noised`` branch set ``rejected_image = image`` after
    noising ``image``).
    """

    add_bos: bool = True
    noise_seed: int = 0
    chosen_noised_mode: Literal["chosen", "both"] = "chosen"

    def side_images(self, example: dict[str, Any]) -> tuple[list[Image.Image], list[Image.Image]]:
        """The (chosen, rejected) images of one example, decoded and noised as its flags say."""
        for key in ("rejected_noised", "chosen_noised"):
            if key not in example:
                raise KeyError(
                    f"example has no {key!r} column: without it the rejected side would silently get the chosen "
                    f"image (keep it through remove_unused_columns; MMedRAGDPOTrainer does)"
                )
        images = [open_image(image) if isinstance(image, (str, os.PathLike)) else image for image in example["images"]]
        chosen, rejected = images, images

        def noise(side: str) -> list[Image.Image]:
            return [
                pair_noise(image.size, self.noise_seed, int(example["pair_index"]), side, index)
                for index, image in enumerate(images)
            ]

        if example["rejected_noised"]:
            rejected = noise("rejected")
        if example["chosen_noised"]:
            chosen = noise("chosen")
            if self.chosen_noised_mode == "both":
                rejected = chosen
        return chosen, rejected

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [dict(example) for example in examples]  # trl's collator rewrites the examples it is given
        rejected_images = []
        for example in examples:
            if "image" in example:
                example["images"] = [example.pop("image")]
            chosen, rejected = self.side_images(example)
            example["images"] = chosen
            rejected_images.append(rejected)
            for key in (*("rejected_noised", "chosen_noised", "pair_index"), "id"):
                example.pop(key, None)
        batch = super().torch_call(examples)
        if self.add_bos:
            batch = with_bos(batch, self.processor.tokenizer, self.max_length)
        flat = [image for images in rejected_images for image in images]
        if flat:
            pixel_values = batch["pixel_values"]
            if pixel_values.shape[0] != 2 * len(flat):
                raise ValueError(
                    f"expected one pixel_values row per image ({2 * len(flat)}: chosen then rejected), got "
                    f"{pixel_values.shape[0]}; this processor tiles images, which the rejected-image swap "
                    f"does not support"
                )
            rejected = self.processor.image_processor(images=flat, return_tensors="pt")["pixel_values"]
            batch["pixel_values"] = torch.cat([pixel_values[: len(flat)], rejected.to(pixel_values.dtype)])
        return batch
