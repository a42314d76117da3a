"""The tiny-model kit: a tokenizer, chat templates, a LLaVA and its processor that behave like the real ones."""

import numpy as np
import pytest
import torch
from jinja2.exceptions import TemplateError
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from mmed_rag.chat_templates import available_chat_templates, load_chat_template
from mmed_rag.testing import (
    IMAGE_TOKEN,
    save_tiny_llava,
    tiny_clip,
    tiny_llava,
    tiny_llava_config,
    tiny_processor,
    tiny_tokenizer,
)

IMAGE_TOKENS_PER_IMAGE = 16  # (32 px / 8 px patches)^2, CLS dropped
RADIOLOGY_PROMPT = (
    "You are a professional radiologist. You are provided with an X-ray image and 1 reference report(s): "
    "1. The lungs are clear. Heart size is normal. No pneumothorax. \n"
    "Please generate a report based on the image. It should be noted that the diagnostic information in the "
    "reference reports cannot be directly used as the basis for diagnosis, but should only be used for reference "
    "and comparison. Please only include the content of the report in your response."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def image(seed: int, size=(40, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


# --- tokenizer ---------------------------------------------------------------------------------------------------


def test_tokenizer_has_the_special_tokens_of_converted_llava_med():
    tokenizer = tiny_tokenizer()
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id] == [
        0,
        1,
        2,
        3,
    ]
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<pad>"]
    assert IMAGE_TOKEN in tokenizer.all_special_tokens
    ids = tokenizer("<image>\nIs there a pleural effusion?").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id  # BOS added, EOS not
    assert ids[1] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)  # <image> is one token, never split
    assert tokenizer.decode(ids, skip_special_tokens=True) == "is there a pleural effusion?"


def test_tokenizer_is_the_same_on_every_call_and_maps_unknown_words_to_unk():
    first, second = tiny_tokenizer(), tiny_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert 500 <= len(first) <= 1000
    assert first.tokenize("zyxwvut pneumothorax") == ["<unk>", "pneumothorax"]


def test_extra_corpus_adds_words_and_leaves_the_default_vocabulary_alone():
    from mmed_rag.data.phantoms import wording

    default, extended = tiny_tokenizer(), tiny_tokenizer(extra_corpus=("coagulative haemorrhages",))
    assert default.tokenize("coagulative haemorrhages") == ["<unk>", "<unk>"]
    assert extended.tokenize("coagulative haemorrhages") == ["coagulative", "haemorrhages"]
    assert tiny_tokenizer().get_vocab() == default.get_vocab()
    phantoms = tiny_tokenizer(extra_corpus=tuple(wording()))
    assert not [token for line in wording() for token in phantoms.tokenize(line) if token == "<unk>"]


def test_tokenizer_covers_the_mmed_rag_prompt_wording_and_numbers():
    tokenizer = tiny_tokenizer()
    assert tokenizer.unk_token not in tokenizer.tokenize(RADIOLOGY_PROMPT)
    assert tokenizer.tokenize("IOP 21 mmHg") == ["iop", "2", "1", "mmhg"]


# --- chat templates ----------------------------------------------------------------------------------------------


def test_llava_med_mistral_template_renders_the_original_mistral_instruct_prompt():
    # LLaVA-Med's conv_mistral_instruct: Llama-2 separator style, system "", sep "", sep2 "</s>";
    # the first human turn is "<image>\n" + question; get_prompt() adds nothing for the pending assistant turn.
    tokenizer = tiny_tokenizer()
    question, answer, follow_up = "<image>\n" + RADIOLOGY_PROMPT, "The heart is normal in size.", "Any effusion?"
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": follow_up},
    ]
    expected = "[INST] " + question + " [/INST]" + " " + answer + " " + "</s>" + "[INST] " + follow_up + " [/INST]"
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected


def test_llava_med_mistral_template_wraps_a_system_message_like_llama_2():
    tokenizer = tiny_tokenizer()
    messages = [{"role": "system", "content": "You are a radiologist."}, {"role": "user", "content": "Is it normal?"}]
    expected = "[INST] <<SYS>>\nYou are a radiologist.\n<</SYS>>\n\nIs it normal? [/INST]"
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected


def test_vicuna_v1_template_renders_the_original_vicuna_v1_prompt():
    # LLaVA-Med's conv_vicuna_v1: "TWO" style; messages are stripped, assistant turns end in "</s> ",
    # the pending assistant turn is "ASSISTANT:", and the whole prompt is stripped.
    tokenizer = tiny_tokenizer("vicuna_v1")
    messages = [
        {"role": "user", "content": "<image>\nIs the heart enlarged? "},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "Any effusion?"},
    ]
    expected = (
        VICUNA_SYSTEM
        + " "
        + "USER: <image>\nIs the heart enlarged?"
        + " "
        + "ASSISTANT: No."
        + "</s> "
        + "USER: Any effusion?"
        + " "
        + "ASSISTANT:"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    closed = messages[:2]
    assert tokenizer.apply_chat_template(closed, tokenize=False) == (
        VICUNA_SYSTEM + " USER: <image>\nIs the heart enlarged? ASSISTANT: No.</s>"
    )


@pytest.mark.parametrize("name", ["llava_med_mistral", "vicuna_v1"])
def test_image_parts_render_as_the_original_image_prefix(processor, name):
    as_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q?"}]}]
    as_text = [{"role": "user", "content": "<image>\n<image>\nQ?"}]
    template = load_chat_template(name)

    def render(messages):
        return processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)

    assert render(as_parts) == render(as_text)


def test_templates_reject_turns_that_do_not_alternate():
    tokenizer = tiny_tokenizer()
    with pytest.raises(TemplateError, match="alternate"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "Hi"}], tokenize=False)


def test_unknown_template_name_lists_the_known_ones():
    assert available_chat_templates() == ["llava_med_mistral", "vicuna_v1"]
    with pytest.raises(ValueError, match="llava_med_mistral, vicuna_v1"):
        load_chat_template("llama_3")


# --- tiny LLaVA --------------------------------------------------------------------------------------------------


def test_tiny_llava_is_configured_like_converted_llava_med(model, processor):
    config = model.config
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.image_token_index == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert config.text_config.vocab_size == len(processor.tokenizer)
    assert config.pad_token_id == config.text_config.pad_token_id == processor.tokenizer.pad_token_id
    assert 150_000 < model.num_parameters() < 300_000


def test_tiny_llava_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    same, other = tiny_llava(seed=1).state_dict(), tiny_llava(seed=2).state_dict()
    assert torch.equal(torch.rand(1), expected_next)
    again = tiny_llava(seed=1).state_dict()
    assert all(torch.equal(same[key], again[key]) for key in same)
    assert not torch.equal(same["lm_head.weight"], other["lm_head.weight"])


def test_processor_expands_one_image_token_per_image_patch_and_the_model_generates(processor, model):
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": RADIOLOGY_PROMPT}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=prompt, images=[image(0)], return_tensors="pt")
    assert inputs.pixel_values.shape == (1, 3, 32, 32)
    assert (inputs.input_ids == model.config.image_token_index).sum() == IMAGE_TOKENS_PER_IMAGE
    assert inputs.input_ids[0, 0] == processor.tokenizer.bos_token_id

    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs.input_ids.shape, len(processor.tokenizer))
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, inputs.input_ids.shape[1] + 4)


def test_apply_chat_template_tokenizes_with_exactly_one_bos(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it normal?"}]}]
    inputs = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"images": [image(0)]},
    )
    assert (inputs.input_ids == processor.tokenizer.bos_token_id).sum() == 1
    assert inputs.pixel_values.shape == (1, 3, 32, 32)


def test_two_images_in_one_prompt_both_reach_the_model(processor, model):
    # DAMON-style prompts show a current and a prior study.
    prompt = "[INST] <image>\n<image>\nCompare the current study with the prior study. [/INST]"
    current, prior, other_prior = image(1), image(2), image(3)
    inputs = processor(text=prompt, images=[current, prior], return_tensors="pt")
    assert inputs.pixel_values.shape == (2, 3, 32, 32)
    assert (inputs.input_ids == model.config.image_token_index).sum() == 2 * IMAGE_TOKENS_PER_IMAGE

    changed = processor(text=prompt, images=[current, other_prior], return_tensors="pt")
    with torch.no_grad():
        logits, changed_logits = model(**inputs).logits, model(**changed).logits
    assert not torch.allclose(logits[0, -1], changed_logits[0, -1])  # the second image is really used
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs.input_ids.shape[1] + 3


def test_saved_tiny_llava_reloads_exactly_through_the_auto_classes(tmp_path, processor):
    directory = save_tiny_llava(tmp_path / "tiny-llava", seed=3)
    original = tiny_llava(seed=3, config=tiny_llava_config(processor.tokenizer))
    reloaded = AutoModelForImageTextToText.from_pretrained(directory)
    reloaded_processor = AutoProcessor.from_pretrained(directory)
    assert isinstance(reloaded, LlavaForConditionalGeneration)

    expected_state = original.state_dict()
    assert reloaded.state_dict().keys() == expected_state.keys()
    assert all(torch.equal(value, expected_state[key]) for key, value in reloaded.state_dict().items())

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": RADIOLOGY_PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert reloaded_processor.apply_chat_template(messages, add_generation_prompt=True) == prompt
    assert reloaded_processor.tokenizer.chat_template == processor.tokenizer.chat_template
    inputs = processor(text=prompt, images=[image(4)], return_tensors="pt")
    reloaded_inputs = reloaded_processor(text=prompt, images=[image(4)], return_tensors="pt")
    assert torch.equal(inputs.input_ids, reloaded_inputs.input_ids)
    assert torch.equal(inputs.pixel_values, reloaded_inputs.pixel_values)
    with torch.no_grad():
        assert torch.equal(original(**inputs).logits, reloaded(**reloaded_inputs).logits)


def test_tiny_clip_is_seeded():
    first, second = tiny_clip(seed=5)[0].state_dict(), tiny_clip(seed=5)[0].state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
