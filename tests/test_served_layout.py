"""LLaVAs are saved in the llava-hf weight layout vLLM reads, and transformers reads them back unchanged."""

import torch
from safetensors import safe_open
from transformers import LlavaForConditionalGeneration

from mmed_rag.generation.served_layout import save_for_serving, served_layout_problem
from mmed_rag.testing import save_tiny_llava, tiny_llava


def weight_names(directory):
    with safe_open(directory / "model.safetensors", "pt") as weights:
        return set(weights.keys())


def test_the_tiny_llava_is_saved_as_vllm_reads_it(tmp_path):
    directory = save_tiny_llava(tmp_path / "tiny")
    assert served_layout_problem(directory) is None
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in weight_names(directory)


def test_a_flat_tower_is_named_and_a_reloaded_model_keeps_the_served_layout(tmp_path):
    model = tiny_llava(seed=1)
    model.save_pretrained(tmp_path / "flat")  # transformers 5's own layout: vision_tower.embeddings.*
    problem = served_layout_problem(tmp_path / "flat")
    assert problem is not None and "vision_tower.embeddings" in problem and "save_for_serving" in problem

    flat = LlavaForConditionalGeneration.from_pretrained(tmp_path / "flat")
    save_for_serving(flat, tmp_path / "served")
    served = LlavaForConditionalGeneration.from_pretrained(tmp_path / "served")
    expected = model.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in served.state_dict().items())
    # What training and merge-lora do with a loaded model: a plain save keeps the layout it was loaded from.
    served.save_pretrained(tmp_path / "resaved")
    assert weight_names(tmp_path / "resaved") == weight_names(tmp_path / "served")
