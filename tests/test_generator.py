"""The generator: batched = one-by-one greedy, several images per prompt, adapters, and bad inputs."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mmed_rag.adapters import AdapterError
from mmed_rag.generation.generator import (
    Generator,
    GeneratorConfig,
    GeneratorError,
    to_message_content,
)
from mmed_rag.testing import save_tiny_llava

PROMPTS = [
    "<image>\nIs there cardiomegaly?",
    "<image>\nYou are provided with an X-ray image and 1 reference report(s): 1. The heart is enlarged. \n"
    "Please answer the question based on the image and report. Question: Is the heart enlarged?",
    "<image>\nDescribe the findings.",
    "<image>\nIs there a pleural effusion? Please choose from the following two options: [yes, no]",
    "<image>\nIs the lung clear?",
]


def image(seed, size=(40, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava", seed=0)


def test_prompt_markers_become_image_parts():
    assert to_message_content("<image>\nIs it normal?") == [
        {"type": "image"},
        {"type": "text", "text": "Is it normal?"},
    ]
    assert to_message_content("<image>\n<image>\nCompare.") == [
        {"type": "image"},
        {"type": "image"},
        {"type": "text", "text": "Compare."},
    ]


def test_batched_greedy_equals_one_by_one(model_dir):
    images = [[image(i)] for i in range(len(PROMPTS))]
    batched = Generator.load(GeneratorConfig(model=str(model_dir), max_new_tokens=8, batch_size=4))
    single = Generator.load(GeneratorConfig(model=str(model_dir), max_new_tokens=8, batch_size=1))
    together = batched.generate(PROMPTS, images)
    assert len(together) == len(PROMPTS) and all(isinstance(text, str) for text in together)
    assert together == single.generate(PROMPTS, images)


def test_the_rendered_prompt_is_llava_meds(model_dir):
    generator = Generator.load(GeneratorConfig(model=str(model_dir)))
    assert generator.render(PROMPTS[0]) == "[INST] <image>\nIs there cardiomegaly? [/INST]"
    inputs = generator._inputs([PROMPTS[0]], [[image(0)]])
    assert inputs["input_ids"][0, 0] == generator.tokenizer.bos_token_id


def test_two_images_per_prompt(model_dir):
    generator = Generator.load(GeneratorConfig(model=str(model_dir), max_new_tokens=4))
    prompt = "<image>\n<image>\nCompare the current study with the prior study."
    first = generator.generate([prompt], [[image(1), image(2)]])
    assert len(first) == 1
    with pytest.raises(GeneratorError, match="2 <image> marker\\(s\\) but 1 image"):
        generator.generate([prompt], [[image(1)]])


def test_sampling_is_seeded(model_dir):
    config = GeneratorConfig(model=str(model_dir), max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    images = [[image(i)] for i in range(3)]
    assert Generator.load(config).generate(PROMPTS[:3], images) == Generator.load(config).generate(PROMPTS[:3], images)


def test_stop_strings_cut_the_answer(model_dir):
    generator = Generator.load(GeneratorConfig(model=str(model_dir), max_new_tokens=12))
    full = generator.generate(PROMPTS[:1], [[image(0)]])[0]
    words = full.split()
    if len(words) < 2:
        pytest.skip("the random tiny model produced fewer than two words")
    cut = Generator.load(GeneratorConfig(model=str(model_dir), max_new_tokens=12, stop_strings=(words[1],)))
    assert words[1] not in cut.generate(PROMPTS[:1], [[image(0)]])[0].split()


def test_lora_adapter_changes_the_model_and_a_corrupt_one_is_named(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    plain = Generator.load(GeneratorConfig(model=str(model_dir)))
    adapted = Generator.load(GeneratorConfig(model=str(model_dir), adapter=str(tmp_path / "adapter")))
    inputs = plain._inputs(PROMPTS[:1], [[image(0)]])
    with torch.no_grad():
        assert not torch.allclose(plain.model(**inputs).logits, adapted.model(**inputs).logits)

    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="cannot load the adapter"):
        Generator.load(GeneratorConfig(model=str(model_dir), adapter=str(tmp_path / "adapter")))
    with pytest.raises(AdapterError, match="not a LoRA adapter directory"):
        Generator.load(GeneratorConfig(model=str(model_dir), adapter=str(tmp_path)))


def test_model_directory_without_a_processor_is_refused(model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, bare / name)
    with pytest.raises(GeneratorError, match="processor"):
        Generator.load(GeneratorConfig(model=str(bare)))
    with pytest.raises(GeneratorError, match="not a model directory"):
        Generator.load(GeneratorConfig(model=str(tmp_path / "nowhere")))


def test_yes_no_probability_is_the_renormalised_first_token_probability(model_dir):
    generator = Generator.load(GeneratorConfig(model=str(model_dir), batch_size=2))
    prompts, images = PROMPTS[:3], [[image(i)] for i in range(3)]
    scores = generator.yes_no_probability(prompts, images)
    inputs = generator._inputs(prompts[:1], images[:1])
    with torch.no_grad():
        probabilities = generator.model(**inputs).logits[0, -1].softmax(-1)
    yes, no = (generator.tokenizer.convert_tokens_to_ids(word) for word in ("yes", "no"))
    assert scores[0] == pytest.approx((probabilities[yes] / (probabilities[yes] + probabilities[no])).item(), 1e-5)
    assert all(0.0 < score < 1.0 for score in scores)
    one_by_one = Generator.load(GeneratorConfig(model=str(model_dir), batch_size=1)).yes_no_probability(prompts, images)
    assert scores == pytest.approx(one_by_one, abs=1e-5)  # left padding does not change a row's score
