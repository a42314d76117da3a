"""``--backend vllm``'s answers to a VQA file, run by tests/test_vllm_backend.py with .venv-vllm's Python.

    .venv-vllm/bin/python tests/vllm_engine_answers.py MODEL VQA_JSONL IMG_ROOT MAX_NEW_TOKENS OUT_JSON

vLLM's environment has no retrievers (open_clip, faiss), so this builds the pipeline's retrieval-free VQA prompts
itself and runs the generator alone. The engine is the one ``VLLMGenerator.load`` builds, made quicker to start on
CPU (eager, the model in the engine's process); the guard below is needed because vLLM spawns its engine.
"""

import json
import sys
from pathlib import Path


def main(model: str, vqa: str, img_root: str, max_new_tokens: str, out: str) -> None:
    import vllm

    from mmed_rag.data.images import load_image
    from mmed_rag.data.records import read_vqa
    from mmed_rag.generation.configs import GeneratorConfig
    from mmed_rag.generation.generator import load_processor
    from mmed_rag.generation.prompts import build_prompt, clean_question
    from mmed_rag.generation.vllm_engine import VLLMGenerator

    records = read_vqa(vqa).records
    prompts = [build_prompt("vqa", "radiology", clean_question(record.question), []) for record in records]
    images = [[load_image(img_root, record.image_paths[0])] for record in records]
    processor = load_processor(Path(model))
    vocabulary = len(processor.tokenizer)
    config = GeneratorConfig(model=model, backend="vllm", max_new_tokens=int(max_new_tokens), top_logprobs=vocabulary)
    engine = vllm.LLM(
        model=model,
        dtype="float32",
        seed=0,
        max_logprobs=vocabulary,
        max_model_len=512,
        enforce_eager=True,
        distributed_executor_backend="uni",
    )
    generator = VLLMGenerator(processor, config, engine)
    result = {
        "question_ids": [record.key for record in records],
        "prompts": prompts,
        "answers": generator.generate(prompts, images),
        "yes_probabilities": generator.yes_no_probability(prompts, images),
    }
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
