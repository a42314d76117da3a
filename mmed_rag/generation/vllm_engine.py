"""``--backend vllm``: a vLLM engine in this process, for a machine where vllm is installed beside mmed-rag.

The engine gets the same chat messages a server would (see :mod:`mmed_rag.generation.served`) and schedules each
batch of the pipeline at once; prompts are checked against the processor's ids and answers decoded locally, as for
``--backend openai``. vLLM pins its own torch and transformers, so it often lives in an environment of its own;
then serve the model there and use ``--backend openai`` from this one. vllm is imported only when this backend
loads. A script that builds the engine needs the ``if __name__ == "__main__":`` guard (vLLM starts its workers by
spawning).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from mmed_rag.generation.configs import GeneratorConfig
from mmed_rag.generation.generator import GeneratorError, check_images, load_processor
from mmed_rag.generation.served import ServedGenerator


class VLLMGenerator(ServedGenerator):
    """The :class:`~mmed_rag.generation.generator.Generator` interface over ``vllm.LLM``."""

    def __init__(self, processor, config: GeneratorConfig, engine):
        super().__init__(processor, config)
        self.engine = engine

    @classmethod
    def load(cls, config: GeneratorConfig) -> VLLMGenerator:
        try:
            import vllm
        except ImportError as error:
            raise GeneratorError(
                f"--backend vllm runs vLLM in this process, but vllm cannot be imported here ({error}). Install it "
                f"beside mmed-rag (pip install vllm), or serve the model from vLLM's own environment (make vllm-env; "
                f"README 'Generation with vLLM') and use --backend openai --api-base URL"
            ) from None
        processor = load_processor(Path(config.model), config.trust_remote_code)
        engine = vllm.LLM(
            model=config.model,
            dtype=config.dtype,
            seed=config.seed,
            trust_remote_code=config.trust_remote_code,
            max_logprobs=min(config.top_logprobs, len(processor.tokenizer)),
        )
        return cls(processor, config, engine)

    def generate(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> list[str]:
        """One answer per prompt, as :meth:`Generator.generate <mmed_rag.generation.generator.Generator.generate>`."""
        outputs = self._run(prompts, images, max_tokens=self.config.max_new_tokens, logprobs=None)
        return [self.answer(output.outputs[0].token_ids, output.outputs[0].text) for output in outputs]

    def yes_no_probability(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) of each prompt's first answer token, from the engine's top log-probs."""
        outputs = self._run(prompts, images, max_tokens=1, logprobs=self.top_logprobs)
        return [
            self.yes_probability(
                position, {token: entry.logprob for token, entry in output.outputs[0].logprobs[0].items()}
            )
            for position, output in enumerate(outputs)
        ]

    def _run(self, prompts, images, max_tokens: int, logprobs: int | None) -> list:
        from vllm import SamplingParams

        config = self.config
        for position, (prompt, prompt_images) in enumerate(zip(prompts, images, strict=True)):
            check_images(position, prompt, prompt_images)
        params = [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=config.temperature if config.do_sample else 0.0,
                top_p=config.top_p if config.do_sample else 1.0,
                seed=config.seed + position if config.do_sample else None,
                stop=list(config.stop_strings) or None,
                logprobs=logprobs,
            )
            for position in range(len(prompts))
        ]
        outputs = self.engine.chat(
            [self.messages(prompt, prompt_images) for prompt, prompt_images in zip(prompts, images, strict=True)],
            params,
            use_tqdm=False,
            add_generation_prompt=True,
            # BOS as the processor's tokenizer adds it (vLLM's chat rendering adds none by default)
            tokenization_kwargs={"add_special_tokens": True},
        )
        for position, (prompt, prompt_images, output) in enumerate(zip(prompts, images, outputs, strict=True)):
            self.check_prompt(position, prompt, prompt_images, output.prompt_token_ids)
        return outputs
