"""The vision-language generator: any transformers image-text-to-text model from a local directory.

LLaVA-Med-1.5 (converted with ``convert-llava-med``) is the reference, but nothing here is LLaVA-specific: the
model and processor come from ``AutoModelForImageTextToText`` / ``AutoProcessor``, and prompts go through the
processor's own chat template. A prompt is MMed-RAG's human turn: text in which each ``<image>`` marker stands for
one image, in order (DAMON prompts carry a current and a prior study). The markers become image parts of a chat
message, so each model's template renders its own image tokens.

Batches are left-padded, so batched greedy decoding gives the same text as decoding one prompt at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from mmed_rag.adapters import load_lora
from mmed_rag.data.records import IMAGE_TOKEN
from mmed_rag.device import resolve_device
from mmed_rag.errors import MMedRAGError, model_directory_problem
from mmed_rag.generation.configs import GeneratorConfig

logger = logging.getLogger(__name__)


class GeneratorError(MMedRAGError, ValueError):
    """A model directory, adapter or prompt that cannot be used for generation."""


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def to_message_content(prompt: str) -> list[dict]:
    """Split a human turn at its ``<image>`` markers into chat-template parts.

    A marker and the newline right after it become one image part, as LLaVA writes ``<image>\\n`` before the
    text; the LLaVA-Med template renders an image part back as ``<image>\\n``, so the prompt is unchanged.
    """
    parts: list[dict] = []
    for index, text in enumerate(prompt.split(IMAGE_TOKEN)):
        if index > 0:
            parts.append({"type": "image"})
            text = text.removeprefix("\n")
        if text:
            parts.append({"type": "text", "text": text})
    return parts


def load_processor(directory: Path, trust_remote_code: bool = False):
    """The processor (tokenizer + image processor + chat template) of a local model directory."""
    from transformers import AutoProcessor

    problem = model_directory_problem(directory)
    if problem:
        raise GeneratorError(problem + " (a local path)")
    try:
        processor = AutoProcessor.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        raise GeneratorError(f"{directory} has no usable processor (tokenizer + image processor): {error}") from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise GeneratorError(
            f"{directory}: AutoProcessor gave a {type(processor).__name__}, not a processor with a tokenizer and "
            f"an image processor; save the model's processor into the directory (processor.save_pretrained)"
        )
    return processor


def render_prompt(processor, prompt: str) -> str:
    """The model's input text for one human turn: the processor's chat template with the generation prompt."""
    message = [{"role": "user", "content": to_message_content(prompt)}]
    return processor.apply_chat_template(message, add_generation_prompt=True)


def check_images(position: int, prompt: str, images: Sequence[Image.Image]) -> None:
    """Each ``<image>`` marker of a prompt needs its image."""
    markers = prompt.count(IMAGE_TOKEN)
    if markers != len(images):
        raise GeneratorError(
            f"prompt {position} has {markers} {IMAGE_TOKEN} marker(s) but {len(images)} image(s) were "
            f"given; put one marker where each image belongs"
        )


def answer_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The first token ids of the answer words' spellings; the two sets must be known and disjoint."""

    def first_ids(word: str) -> list[int]:
        spellings = (word, word.lower(), f" {word}", f" {word.lower()}")
        ids = {tokenizer.encode(text, add_special_tokens=False)[0] for text in spellings}
        return sorted(ids - {tokenizer.unk_token_id})

    yes_ids, no_ids = first_ids("Yes"), first_ids("No")
    if not yes_ids or not no_ids or set(yes_ids) & set(no_ids):
        raise GeneratorError(
            f"the tokenizer cannot tell 'yes' from 'no' by the first token (yes: {yes_ids}, no: {no_ids}); "
            f"yes/no scores need distinct first tokens"
        )
    return yes_ids, no_ids


def trim_answer(text: str, stop_strings: Sequence[str]) -> str:
    """An answer cut at its first stop string, without surrounding whitespace."""
    for stop in stop_strings:
        text = text.split(stop, 1)[0]
    return text.strip()


class Generator:
    """A loaded model + processor that turns (prompt, images) pairs into text, in batches."""

    def __init__(self, model, processor, config: GeneratorConfig):
        self.model = model.eval()
        self.processor = processor
        self.config = config
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def load(cls, config: GeneratorConfig) -> Generator:
        from transformers import AutoModelForImageTextToText

        directory = Path(config.model)
        processor = load_processor(directory, config.trust_remote_code)
        device = resolve_device(config.device)
        model = AutoModelForImageTextToText.from_pretrained(
            directory, dtype=_dtype(config.dtype, device), trust_remote_code=config.trust_remote_code
        ).to(device)
        if config.adapter is not None:
            model = load_lora(model, config.adapter)
        logger.info(
            "Loaded generator %s (%s, %s)%s",
            directory,
            model.dtype,
            device,
            f" with adapter {config.adapter}" if config.adapter else "",
        )
        return cls(model, processor, config)

    def render(self, prompt: str) -> str:
        """The model's input text for one human turn: the chat template with the generation prompt."""
        return render_prompt(self.processor, prompt)

    def _inputs(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]):
        texts, flat_images = [], []
        for position, (prompt, prompt_images) in enumerate(zip(prompts, images, strict=True)):
            check_images(position, prompt, prompt_images)
            texts.append(self.render(prompt))
            # Padding to square, where the model was trained that way (LLaVA-Med), is the image processor's job:
            # convert-llava-med writes a LlavaImageProcessor with do_pad.
            flat_images += [image.convert("RGB") for image in prompt_images]
        inputs = self.processor(text=texts, images=flat_images or None, padding=True, return_tensors="pt")
        return inputs.to(self.model.device)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> list[str]:
        """One answer per prompt; ``images[i]`` are the images of ``prompts[i]``, one per ``<image>`` marker."""
        answers: list[str] = []
        for start in range(0, len(prompts), self.config.batch_size):
            batch = slice(start, start + self.config.batch_size)
            inputs = self._inputs(prompts[batch], images[batch])
            if self.config.do_sample:
                torch.manual_seed(self.config.seed + start)
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.config.max_new_tokens,
                do_sample=self.config.do_sample,
                temperature=self.config.temperature if self.config.do_sample else None,
                top_p=self.config.top_p if self.config.do_sample else None,
                stopping_criteria=self._stopping(inputs["input_ids"].shape[1]),
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers += [self._trim(text) for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return answers

    @torch.no_grad()
    def yes_no_probability(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) of each prompt's first answer token: a score for AUC, from one forward pass.

        Greedy text only says yes or no; ranking metrics need a confidence. The answer's first token decides it,
        so the score sums the probabilities of every spelling the tokenizer starts "Yes"/"yes" (or "No"/"no")
        with, with or without a leading space, and renormalises over the two answers.
        """
        yes_ids, no_ids = answer_token_ids(self.tokenizer)
        scores: list[float] = []
        for start in range(0, len(prompts), self.config.batch_size):
            batch = slice(start, start + self.config.batch_size)
            inputs = self._inputs(prompts[batch], images[batch])
            # Left padding: the last position of every row is its prompt's last token.
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1].float()
            probabilities = logits.softmax(dim=-1)
            yes = probabilities[:, yes_ids].sum(dim=-1)
            no = probabilities[:, no_ids].sum(dim=-1)
            scores += (yes / (yes + no).clamp_min(torch.finfo(torch.float32).tiny)).tolist()
        return scores

    def _stopping(self, prompt_length: int):
        from transformers import StoppingCriteriaList

        if not self.config.stop_strings:
            return None
        return StoppingCriteriaList([_StopOnStrings(self.tokenizer, self.config.stop_strings, prompt_length)])

    def _trim(self, text: str) -> str:
        return trim_answer(text, self.config.stop_strings)


def load_generator(config: GeneratorConfig):
    """The generator of ``config.backend``: transformers here, an OpenAI-compatible server, or vLLM here.

    All three answer ``generate(prompts, images)`` and ``yes_no_probability(prompts, images)`` alike and carry the
    config as ``.config``, so the pipeline (batches, resumable output) does not depend on the backend.
    """
    if config.backend == "openai":
        from mmed_rag.generation.openai_backend import OpenAIGenerator

        return OpenAIGenerator.load(config)
    if config.backend == "vllm":
        from mmed_rag.generation.vllm_engine import VLLMGenerator

        return VLLMGenerator.load(config)
    return Generator.load(config)


def greedy_generator(model: str, max_new_tokens: int, batch_size: int, device: str) -> Generator:
    """A greedy-decoding generator of a local model: what the DAMON stages answer and diagnose with."""
    return Generator.load(
        GeneratorConfig(model=model, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
    )


class _StopOnStrings:
    """Stop each sequence once its decoded answer contains a stop string.

    transformers' own ``stop_strings`` needs a tokenizer whose tokens decode with a static prefix, which
    word-level and normalising tokenizers do not; decoding the (short) answer each step works with any tokenizer.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_length: int):
        self.tokenizer, self.stop_strings, self.prompt_length = tokenizer, tuple(stop_strings), prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        answers = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [any(stop in answer for stop in self.stop_strings) for answer in answers]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
