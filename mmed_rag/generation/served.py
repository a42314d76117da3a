"""What the vLLM backends share: the prompt ``--backend hf`` feeds the model, checked token by token.

``--backend openai`` (a server) and ``--backend vllm`` (an engine in this process) send chat messages: a prompt's
``<image>`` markers become image parts (lossless PNG data URLs), and vLLM applies the model directory's own chat
template, as the processor does for ``--backend hf``. Two details would still let the prompts drift apart, so both
are pinned: vLLM's chat rendering adds no BOS while the processor's tokenizer does (the request asks for the
tokenizer's special tokens), and a server may be started with another template (``--chat-template``) or another
model. So every request also asks for the prompt's token ids, and each answer is accepted only if they equal the
ids the local processor gives the same prompt and images. A server that returns no ids (not vLLM) is not checked.

Answers are decoded from the returned token ids with the local tokenizer and trimmed as ``--backend hf`` does,
so equal tokens give equal text whatever the server's own detokenizer does with spaces.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from collections.abc import Mapping, Sequence

from PIL import Image

from mmed_rag.generation.configs import GeneratorConfig
from mmed_rag.generation.generator import (
    GeneratorError,
    answer_token_ids,
    render_prompt,
    to_message_content,
    trim_answer,
)

logger = logging.getLogger(__name__)


class PromptMismatchError(GeneratorError):
    """The engine tokenised a prompt differently from the model's processor."""


def image_data_url(image: Image.Image) -> str:
    """An image as a PNG data URL: lossless, so the server decodes the very pixels ``--backend hf`` processes."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class ServedGenerator:
    """The model directory's processor, to render, check and decode what a vLLM engine is sent and answers."""

    def __init__(self, processor, config: GeneratorConfig):
        self.processor = processor
        self.config = config
        self.tokenizer = processor.tokenizer
        # More log-probs than the vocabulary has tokens kill vLLM 0.32's engine (torch.topk out of range).
        self.top_logprobs = min(config.top_logprobs, len(self.tokenizer))
        self._answer_ids: tuple[list[int], list[int]] | None = None

    @staticmethod
    def messages(prompt: str, images: Sequence[Image.Image]) -> list[dict]:
        """One user turn in the OpenAI chat format: text parts and image parts, in the prompt's order."""
        remaining = iter(images)
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(next(remaining))}}
            if part["type"] == "image"
            else part
            for part in to_message_content(prompt)
        ]
        return [{"role": "user", "content": content}]

    def check_prompt(
        self, position: int, prompt: str, images: Sequence[Image.Image], served: Sequence[int] | None
    ) -> None:
        """Refuse an answer whose prompt ids differ from those ``--backend hf`` feeds the model."""
        if served is None:
            return
        pixels = [image.convert("RGB") for image in images] or None
        inputs = self.processor(text=[render_prompt(self.processor, prompt)], images=pixels)
        expected, served = list(inputs["input_ids"][0]), list(served)
        if served == expected:
            return
        first = next(
            (i for i, (a, b) in enumerate(zip(served, expected, strict=False)) if a != b),
            min(len(served), len(expected)),
        )
        raise PromptMismatchError(
            f"prompt {position}: the engine's prompt is not the one the model's chat template gives (token {first}: "
            f"engine {served[first : first + 4]}, processor {expected[first : first + 4]}; {len(served)} vs "
            f"{len(expected)} tokens). Serve the directory given as --model with its own chat template (no "
            f"--chat-template)"
        )

    def answer(self, token_ids: Sequence[int] | None, text: str | None) -> str:
        """The answer text: decoded from its token ids as ``--backend hf`` decodes, else the engine's text."""
        if token_ids is not None:
            text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return trim_answer(text or "", self.config.stop_strings)

    def yes_probability(self, position: int, first_token_logprobs: Mapping[int, float]) -> float:
        """P(yes) / (P(yes) + P(no)) from the answer's first-token log-probs, as ``--backend hf`` computes it.

        The engine returns only the ``top_logprobs`` likeliest tokens; a yes/no spelling outside them counts as
        zero (it is less likely than all of them), and a prompt with neither answer among them is an error.
        """
        if self._answer_ids is None:
            self._answer_ids = answer_token_ids(self.tokenizer)
        yes_ids, no_ids = self._answer_ids
        yes = sum(math.exp(first_token_logprobs[i]) for i in yes_ids if i in first_token_logprobs)
        no = sum(math.exp(first_token_logprobs[i]) for i in no_ids if i in first_token_logprobs)
        if yes + no == 0:
            raise GeneratorError(
                f"prompt {position}: neither 'yes' nor 'no' is among the {self.top_logprobs} likeliest first "
                f"tokens; raise --top-logprobs (and the server's --max-logprobs) for yes/no scores"
            )
        return yes / (yes + no)
