"""Multi-image prompts, and the tiny LLaVA answering a question about a main and a reference image."""

import numpy as np
import pytest
from PIL import Image

from mmed_rag.damon.data import MultiImageRecord
from mmed_rag.damon.prompts import multi_image_prompt, record_prompt
from mmed_rag.generation.configs import GeneratorConfig
from mmed_rag.generation.generator import Generator, GeneratorError
from mmed_rag.testing import save_tiny_llava

DIAGNOSIS = "The main image shows signs of pleural effusion. The reference image shows no sign of these conditions."


def test_prompts_place_one_marker_per_image_and_the_diagnosis_before_the_question():
    assert multi_image_prompt("what has changed compared to the reference image?", 2, DIAGNOSIS) == (
        "The main image: <image>\nThe reference image: <image>\n"
        f"Preliminary diagnosis: {DIAGNOSIS}\nQuestion: what has changed compared to the reference image?"
    )
    assert "Preliminary" not in multi_image_prompt("is there edema?", 2)  # switched off
    own = MultiImageRecord(
        0, ("m.png", "r.png"), "What has changed between the main image<image>\n and the reference image<image>\n?", "x"
    )
    assert record_prompt(own) == own.question
    assert record_prompt(own, DIAGNOSIS).startswith(f"Preliminary diagnosis: {DIAGNOSIS}\nWhat has changed")
    with pytest.raises(ValueError, match="2 <image> markers for 3 image"):
        record_prompt(MultiImageRecord(0, ("a", "b", "c"), own.question, "x"))


def test_the_generator_reads_both_images(tmp_path):
    generator = Generator.load(GeneratorConfig(model=str(save_tiny_llava(tmp_path / "llava")), max_new_tokens=4))
    prompt = multi_image_prompt("is there pleural effusion?", 2, DIAGNOSIS)
    rng = np.random.default_rng(0)
    main, reference, other = (Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3))
    (answer,) = generator.generate([prompt], [[main, reference]])
    assert isinstance(answer, str)
    # The reference image reaches the model: swapping it for another changes the answer's probabilities.
    first, second = generator.yes_no_probability([prompt, prompt], [[main, reference], [main, other]])
    assert first != second
    with pytest.raises(GeneratorError, match="2 <image> marker"):
        generator.generate([prompt], [[main]])
