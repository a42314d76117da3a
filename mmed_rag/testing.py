"""Tiny, seeded, offline stand-ins for the real models, shared by the tests, the demo and the benchmarks.

Nothing can be downloaded from a model hub on the machines this project is built on, and the real generator
(LLaVA-Med-1.5, 7B parameters) and retrievers do not fit a 2-core test run anyway. The factories here build
models of the same classes and formats as the real ones, a few hundred thousand parameters each, so every
stage (retrieval, prompting, generation, DPO, saving and reloading) runs end to end in seconds:

- :func:`tiny_tokenizer`: a word-level tokenizer trained on a built-in corpus of medical report and VQA wording
  (including the MMed-RAG prompts), with the special tokens of the converted LLaVA-Med tokenizer.
- :func:`tiny_llava` / :func:`tiny_processor`: a ``LlavaForConditionalGeneration`` (CLIP vision tower +
  Mistral text model, configured as converted LLaVA-Med) and the matching ``LlavaProcessor``.
- :func:`tiny_clip`: an open_clip retriever built from ``model_configs/tiny-clip.json``.
- :func:`non_medical_images`: images a user may feed a medical model by mistake, for out-of-distribution checks.

Every factory is deterministic: the same call gives the same vocabulary and the same weights.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from matplotlib import cbook
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mmed_rag.chat_templates import LLAVA_MED_MISTRAL, load_chat_template
from mmed_rag.generation.configs import TinyModelConfig
from mmed_rag.generation.served_layout import save_for_serving
from mmed_rag.retrieval.clip import create_clip

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
# The order fixes the ids: <unk>=0, <s>=1, </s>=2 as in the Llama/Mistral tokenizers LLaVA-Med inherits.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

#: Shapes of the tiny LLaVA. The vision tower sees 32-px images in 8-px patches: 16 patches plus CLS, and with
#: ``vision_feature_select_strategy="default"`` the CLS token is dropped, so one image is 16 image tokens.
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}

#: Text shapes a vLLM CPU server can run: its attention takes head_dim 32, 64, 80, ... (the default is 16).
SERVABLE_TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1}


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_json(extra_corpus: tuple[str, ...] = ()) -> str:
    """Train the word-level vocabulary once per process; it depends only on the corpus file (and extra lines)."""
    corpus = (resources.files("mmed_rag") / "testing_corpus.txt").read_text(encoding="utf-8").splitlines()
    corpus += list(extra_corpus)
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    # Lower-casing and one token per punctuation mark and per digit keep the vocabulary small while any
    # report, number or prompt still tokenizes; words outside the corpus become <unk>.
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    # Ties in frequency are broken by the word itself, so the same corpus gives the same ids in every process.
    trainer = trainers.WordLevelTrainer(vocab_size=10_000, min_frequency=1, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    # Like the Llama/Mistral tokenizers: BOS is added, EOS is not (the chat template writes "</s>" itself).
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    # Words are joined with spaces; cleanup glues punctuation back (" ." -> ".") so decoded text reads naturally.
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tokenizer.to_str()


def tiny_tokenizer(
    chat_template: str = LLAVA_MED_MISTRAL, extra_corpus: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """A ~720-word tokenizer with the special tokens of converted LLaVA-Med and its chat template.

    ``chat_template`` names a template of :mod:`mmed_rag.chat_templates`. ``extra_corpus``: more lines to learn
    words from (the demo's stand-in adds the phantoms' wording, so that no finding is an ``<unk>``).
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(tuple(extra_corpus))),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=[IMAGE_TOKEN],
        model_max_length=TINY_TEXT["max_position_embeddings"],
        chat_template=load_chat_template(chat_template),
    )


def tiny_llava_config(
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    vision: dict | None = None,
    text: dict | None = None,
) -> LlavaConfig:
    """The tiny LLaVA's config, matched to ``tokenizer`` (default: :func:`tiny_tokenizer`).

    ``vision`` and ``text`` override entries of :data:`TINY_VISION` and :data:`TINY_TEXT` (e.g. a larger
    ``image_size`` for a demo). The feature layer and selection follow converted LLaVA-Med:
    ``mm_vision_select_layer: -2`` and patch features without CLS.
    """
    tokenizer = tokenizer or tiny_tokenizer()
    vision_config = CLIPVisionConfig(**{**TINY_VISION, **(vision or {})})
    text_config = MistralConfig(
        **{**TINY_TEXT, **(text or {})},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_llava(seed: int = 0, config: LlavaConfig | None = None) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LLaVA (about 200k parameters), the same for the same ``seed``.

    The global torch RNG is left as it was. The model is returned in eval mode, like ``from_pretrained``.
    """
    config = config or tiny_llava_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model.eval()


def tiny_image_processor(image_size: int = TINY_VISION["image_size"]) -> CLIPImageProcessor:
    """CLIP preprocessing (resize the short side, centre crop, CLIP mean/std) at the tiny model's image size."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


def tiny_processor(
    chat_template: str = LLAVA_MED_MISTRAL,
    image_size: int = TINY_VISION["image_size"],
    patch_size: int = TINY_VISION["patch_size"],
    extra_corpus: tuple[str, ...] = (),
) -> LlavaProcessor:
    """The ``LlavaProcessor`` for :func:`tiny_llava`: each ``<image>`` in a prompt expands to one image token per
    patch (16 at the default 32 px in 8-px patches); ``image_size``/``patch_size`` must match the vision config.

    ``num_additional_image_tokens=1`` counts the CLIP CLS token, which the "default" strategy then removes again;
    without it the processor would insert one image token fewer than the model has features.
    """
    return LlavaProcessor(
        image_processor=tiny_image_processor(image_size),
        tokenizer=tiny_tokenizer(chat_template, extra_corpus),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=load_chat_template(chat_template),
    )


def save_tiny_llava(
    directory: str | os.PathLike,
    seed: int = 0,
    chat_template: str = LLAVA_MED_MISTRAL,
    *,
    vision: dict | None = None,
    text: dict | None = None,
    extra_corpus: tuple[str, ...] = (),
) -> Path:
    """Write a tiny LLaVA checkpoint (model + processor) to ``directory``, laid out like a hub checkpoint.

    ``vision`` and ``text`` override the shapes as in :func:`tiny_llava_config` (the demo's stand-in model is a
    larger one); the processor follows the vision tower's image and patch size, its tokenizer learns words from
    ``extra_corpus`` too (see :func:`tiny_tokenizer`).

    The directory loads with ``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained``,
    so code paths that take a model path (CLI, conversion, DPO) can be tested without the 7B model, and its weights
    are in the layout vLLM reads (:mod:`mmed_rag.generation.served_layout`); vLLM's CPU attention also needs a text
    head_dim of 32 or more (e.g. ``text=SERVABLE_TEXT``).
    """
    directory = Path(directory)
    shape = {**TINY_VISION, **(vision or {})}
    processor = tiny_processor(chat_template, shape["image_size"], shape["patch_size"], tuple(extra_corpus))
    save_for_serving(tiny_llava(seed, tiny_llava_config(processor.tokenizer, vision=vision, text=text)), directory)
    processor.save_pretrained(directory)
    logger.info("Saved tiny LLaVA (seed %d) to %s", seed, directory)
    return directory


def make_tiny_model(config: TinyModelConfig) -> Path:
    """Write a tiny LLaVA (random weights: it answers with unrelated words until trained) to ``config.out``."""
    from mmed_rag.atomic import publish_directory
    from mmed_rag.outputs import claim_outputs

    out = Path(config.out)
    with claim_outputs("make-tiny-model", replaced=[out]):
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        save_tiny_llava(staging, config.seed, config.chat_template)
        publish_directory(staging, out)
    return out


def tiny_clip(seed: int = 0, model: str = "tiny-clip"):
    """A randomly initialised tiny open_clip retriever, the same for the same ``seed``.

    Returns ``(model, preprocess_train, preprocess_val, tokenizer)`` as :func:`mmed_rag.retrieval.clip.create_clip`;
    ``model`` is ``"tiny-clip"`` (ViT) or ``"tiny-clip-rn"`` (ModifiedResNet, like the original RN50 retrievers).
    The global torch RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_clip(model)


def non_medical_images(size: int = 128) -> dict[str, Image.Image]:
    """Nine images no medical modality should claim, by name: uniform noise in colour and in grey, a colour and a
    grey gradient, white, black and grey frames, a photograph and a logo (the last two ship with matplotlib)."""
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, size)
    across, down = np.meshgrid(ramp, ramp)
    colour_gradient = np.stack([across, down, np.full_like(across, 128.0)], axis=-1).astype(np.uint8)
    return {
        "noise": Image.fromarray(noise),
        "grey noise": Image.fromarray(noise[..., 0]).convert("RGB"),
        "gradient": Image.fromarray(colour_gradient),
        "grey gradient": Image.fromarray(across.astype(np.uint8)).convert("RGB"),
        "white": Image.new("RGB", (size, size), "white"),
        "black": Image.new("RGB", (size, size), "black"),
        "grey": Image.new("RGB", (size, size), (128, 128, 128)),
        "photo": Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"),
        "logo": Image.open(cbook.get_sample_data("logo2.png")).convert("RGB"),
    }


def free_port() -> int:
    """A TCP port free right now on this machine, for a launcher's --master_port in tests run side by side."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
