"""convert-llava-med: a tiny LLaVA-Med in the ORIGINAL layout converts to transformers' LLaVA with the same logits.

Each test writes a checkpoint the way the LLaVA-Med code base saves one (config.json with ``llava_mistral`` and
``mm_*`` fields, LLaVA's weight names, a tokenizer without ``<image>``), converts it, and checks the result against
a forward pass written here from the original tensors: CLIP hidden_states[-2] without CLS, Linear-GELU-Linear,
features spliced in where the original's -200 token stands, Mistral on the embeddings.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mmed_rag.config import add_config_arguments, config_from_args
from mmed_rag.generation import convert
from mmed_rag.generation.convert import ConversionError, ConvertConfig, convert_llava_med
from mmed_rag.generation.served_layout import served_layout_problem
from mmed_rag.testing import TINY_TEXT, TINY_VISION, tiny_tokenizer

TOWER_NAME = "tiny/clip-vit-b8-32"  # the mm_vision_tower our tiny checkpoints name
IMAGE_TOKENS = 16  # (32 px / 8 px)^2 patches, CLS dropped
ROPE_THETA = 1e6  # as llava-med-v1.5-mistral-7b; not transformers' default, so it must be carried over
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a pleural effusion?"}]}]
CLIP_PREPROCESSOR = {  # openai/clip-vit-large-patch14-336's preprocessor_config.json, in its old format, at 32 px
    "crop_size": 32,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
    "resample": 3,
    "size": 32,
}


# -- the original checkpoint -------------------------------------------------------------------------------------


def tokenizer_without_image_token() -> PreTrainedTokenizerFast:
    """The tiny tokenizer as LLaVA-Med ships its Mistral one: no <image> token, no chat template."""
    spec = json.loads(tiny_tokenizer().backend_tokenizer.to_str())
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["content"] != "<image>"]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


TEXT_VOCAB = len(tokenizer_without_image_token())
TEXT_CONFIG = {**TINY_TEXT, "vocab_size": TEXT_VOCAB, "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-5}


@dataclasses.dataclass
class Original:
    """The tensors of a tiny original LLaVA-Med: Mistral, mm_projector (mlp2x_gelu) and a CLIP vision tower."""

    text: dict
    projector: dict
    vision: dict  # CLIPVisionModel's own names (embeddings.*, encoder.*, ...)

    @classmethod
    def make(cls, seed: int = 0) -> "Original":
        torch.manual_seed(seed)
        text = MistralForCausalLM(reference_text_config()).state_dict()
        projector = torch.nn.Sequential(
            torch.nn.Linear(TINY_VISION["hidden_size"], TINY_TEXT["hidden_size"]),
            torch.nn.GELU(),
            torch.nn.Linear(TINY_TEXT["hidden_size"], TINY_TEXT["hidden_size"]),
        ).state_dict()
        vision = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).state_dict()
        return cls(text=text, projector=projector, vision=vision)

    def llava_state_dict(self, vision_inside: bool) -> dict:
        """Names as LLaVA's LlavaMistralForCausalLM.state_dict() has them."""
        state = dict(self.text)  # model.embed_tokens / model.layers / model.norm / lm_head
        state.update({f"model.mm_projector.{key}": value for key, value in self.projector.items()})
        if vision_inside:
            state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in self.vision.items()})
        return state


def reference_text_config() -> MistralConfig:
    return MistralConfig(**TEXT_CONFIG, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})


def write_original(directory: Path, original: Original, vision_inside: bool, fmt: str = "safetensors", drop=()) -> Path:
    """An original LLaVA-Med directory: LLaVA config.json, weights in two shards with an index, the tokenizer."""
    directory.mkdir(parents=True)
    config = {
        "architectures": ["LlavaMistralForCausalLM"],
        "model_type": "llava_mistral",
        **TEXT_CONFIG,
        "hidden_act": "silu",
        "rope_theta": ROPE_THETA,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": TINY_VISION["hidden_size"],
        "mm_patch_merge_type": "flat",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": TOWER_NAME,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "use_mm_proj": True,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = {key: value for key, value in original.llava_state_dict(vision_inside).items() if key not in drop}
    # LLaVA's old per-layer rotary buffer: saved by old checkpoints, recomputed by transformers.
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    keys = sorted(state)
    shards = {f"model-0000{i + 1}-of-00002.{fmt}": keys[i::2] for i in range(2)}
    for name, shard_keys in shards.items():
        tensors = {key: state[key].clone().contiguous() for key in shard_keys}
        if fmt == "safetensors":
            save_file(tensors, directory / name)
        else:
            torch.save(tensors, directory / name)
    index = {"metadata": {}, "weight_map": {key: name for name, shard in shards.items() for key in shard}}
    index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (directory / index_name).write_text(json.dumps(index))
    tokenizer_without_image_token().save_pretrained(directory)
    return directory


def write_clip_dir(directory: Path, original: Original, layout: str) -> Path:
    """A local CLIP directory: ``config-only``, ``clip-vision`` (5.x save_pretrained) or ``clip-model`` (.bin)."""
    directory.mkdir(parents=True)
    if layout == "clip-model":
        CLIPConfig(
            vision_config=TINY_VISION, text_config={"hidden_size": 16, "num_attention_heads": 2}
        ).save_pretrained(directory)
        state = {f"vision_model.{key}": value for key, value in original.vision.items()}
        state.update({"logit_scale": torch.tensor(2.6), "text_model.final_layer_norm.weight": torch.ones(16)})
        torch.save(state, directory / "pytorch_model.bin")
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
        if layout == "clip-vision":
            model.load_state_dict(original.vision)
            model.save_pretrained(directory)
        else:
            model.config.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR))
    return directory


@pytest.fixture
def tiny_preset(monkeypatch):
    """Make the tiny tower a built-in preset, as openai/clip-vit-large-patch14-336 is for the real model."""
    monkeypatch.setitem(
        convert.VISION_TOWER_PRESETS,
        TOWER_NAME,
        {
            "vision_config": dict(TINY_VISION),
            "image_processor": {
                "size": {"shortest_edge": 32},
                "crop_size": {"height": 32, "width": 32},
                "image_mean": list(OPENAI_CLIP_MEAN),
                "image_std": list(OPENAI_CLIP_STD),
                "resample": 3,
            },
        },
    )


@pytest.fixture(scope="module")
def original() -> Original:
    return Original.make()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, original) -> Path:
    """One conversion shared by the loading, generation and preprocessing tests (tower given as a directory)."""
    root = tmp_path_factory.mktemp("convert")
    src = write_original(root / "llava-med", original, vision_inside=False)
    tower = write_clip_dir(root / "clip", original, "clip-vision")
    return convert_llava_med(ConvertConfig(src=str(src), dst=str(root / "hf"), vision_tower=str(tower)))


# -- the reference forward of the original ---------------------------------------------------------------------


def reference_logits(original: Original, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_id: int):
    """LLaVA's forward from the original tensors: the run of image tokens stands for the original's one -200 id."""
    vision = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).eval()
    vision.load_state_dict(original.vision)
    projector = torch.nn.Sequential(
        torch.nn.Linear(TINY_VISION["hidden_size"], TINY_TEXT["hidden_size"]),
        torch.nn.GELU(),
        torch.nn.Linear(TINY_TEXT["hidden_size"], TINY_TEXT["hidden_size"]),
    )
    projector.load_state_dict(original.projector)
    language_model = MistralForCausalLM(reference_text_config()).eval()
    language_model.load_state_dict(original.text)
    with torch.no_grad():
        patches = vision(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]  # select_layer -2, patch
        features = projector(patches)[0]
        ids = input_ids[0].tolist()
        start = ids.index(image_id)
        end = start + IMAGE_TOKENS
        assert ids[start:end] == [image_id] * IMAGE_TOKENS and image_id not in ids[end:]
        embed = language_model.get_input_embeddings()
        embeds = torch.cat([embed(input_ids[0, :start]), features, embed(input_ids[0, end:])])
        return language_model(inputs_embeds=embeds[None]).logits


def image(size, seed=0, mode="RGB") -> Image.Image:
    width, height = size
    channels = (height, width, 3) if mode == "RGB" else (height, width)
    picture = Image.fromarray(np.random.default_rng(seed).integers(0, 256, channels, dtype=np.uint8))
    assert picture.mode == mode
    return picture


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """LLaVA's (and MMed-RAG's) mm_utils.expand2square."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


# -- tests -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vision_inside", "tower_layout", "fmt"),
    [
        (True, None, "safetensors"),  # tower in the checkpoint, its shapes from the built-in preset
        (True, "config-only", "safetensors"),  # tower in the checkpoint, its config from --vision-tower
        (False, "clip-vision", "bin"),  # tower from a CLIPVisionModel directory; .bin shards in the source
        (False, "clip-model", "safetensors"),  # tower from a CLIPModel directory (.bin, vision_model.* names)
    ],
)
def test_converted_model_computes_the_original_logits(
    tmp_path, original, tiny_preset, vision_inside, tower_layout, fmt
):
    src = write_original(tmp_path / "llava-med", original, vision_inside=vision_inside, fmt=fmt)
    tower = write_clip_dir(tmp_path / "clip", original, tower_layout) if tower_layout else None
    dst = convert_llava_med(
        ConvertConfig(src=str(src), dst=str(tmp_path / "hf"), vision_tower=str(tower) if tower else None)
    )

    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    processor = AutoProcessor.from_pretrained(dst, backend="pil")
    prompt = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    assert prompt == "[INST] <image>\nIs there a pleural effusion? [/INST]"
    inputs = processor(images=image((40, 28)), text=prompt, return_tensors="pt")
    image_id = model.config.image_token_id
    assert (inputs.input_ids == image_id).sum() == IMAGE_TOKENS
    with torch.no_grad():
        logits = model(**inputs).logits

    expected = reference_logits(original, inputs.input_ids, inputs.pixel_values, image_id)
    torch.testing.assert_close(logits[..., :TEXT_VOCAB], expected, rtol=0, atol=1e-5)
    # New rows are the mean of the old ones, so their logits are the mean of the original logits.
    torch.testing.assert_close(
        logits[..., TEXT_VOCAB:], expected.mean(-1, keepdim=True).expand(-1, -1, 768 - TEXT_VOCAB), rtol=0, atol=1e-5
    )

    report = json.loads((dst / "conversion_report.json").read_text())
    assert report["vocab"] == {
        "tokenizer_before": TEXT_VOCAB,
        "tokenizer_after": TEXT_VOCAB + 1,
        "embedding_rows_before": TEXT_VOCAB,
        "embedding_rows_after": 768,  # 720 rounded up to a multiple of 64
        "new_rows": "mean of the original rows",
        "image_token": "<image>",
        "image_token_id": TEXT_VOCAB,
        "pad_token": "<pad>",
    }
    assert report["keys"]["written"] == len(model.state_dict())
    assert report["keys"]["projector"] == 4 and report["keys"]["vision"] == len(original.vision)
    assert report["keys"]["dropped"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert report["vision_tower"]["weights"] == ("source" if vision_inside else str(tower))
    assert report["dtype"] == "float32"
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary left


def test_converted_model_loads_with_auto_classes_and_generates(converted):
    model = AutoModelForImageTextToText.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    assert model.config.image_seq_length == IMAGE_TOKENS and model.config.projector_hidden_act == "gelu"
    assert model.config.text_config.rope_parameters["rope_theta"] == ROPE_THETA
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == "<image>"
    assert "<image>" in processor.tokenizer.all_special_tokens

    prompt = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    inputs = processor(images=image((48, 32)), text=prompt, return_tensors="pt")
    output = model.generate(**inputs, min_new_tokens=4, max_new_tokens=4, do_sample=False)
    assert output.shape == (1, inputs.input_ids.shape[1] + 4)
    assert isinstance(processor.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True), str)


def test_converted_weights_are_in_the_layout_vllm_serves(converted):
    """vLLM reads LLaVA's tower only as vision_tower.vision_model.*; tests/test_vllm_backend.py serves a conversion."""
    assert served_layout_problem(converted) is None


@pytest.mark.parametrize(("size", "mode"), [((60, 24), "RGB"), ((23, 50), "RGB"), ((45, 31), "L"), ((32, 32), "RGB")])
def test_pad_to_square_matches_llava_expand2square(converted, size, mode):
    picture = image(size, seed=1, mode=mode)
    # MMed-RAG opens images with .convert("RGB"), pads with the CLIP mean colour, then runs the CLIP processor.
    clip = CLIPImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        resample=3,
    )
    padded = expand2square(picture.convert("RGB"), tuple(int(x * 255) for x in clip.image_mean))
    expected = clip(padded, return_tensors="pt").pixel_values

    exact = AutoProcessor.from_pretrained(converted, backend="pil").image_processor
    assert torch.equal(exact(picture, return_tensors="pt").pixel_values, expected)
    # The default (torchvision) backend resizes with its own bicubic kernel: within about one grey level.
    default = AutoProcessor.from_pretrained(converted).image_processor
    torch.testing.assert_close(default(picture, return_tensors="pt").pixel_values, expected, rtol=0, atol=0.02)


def test_tower_saved_in_the_source_wins_over_a_differing_directory(tmp_path, original, caplog):
    src = write_original(tmp_path / "llava-med", original, vision_inside=True)
    other = Original.make(seed=1)
    tower = write_clip_dir(tmp_path / "clip", other, "clip-vision")
    dst = convert_llava_med(ConvertConfig(src=str(src), dst=str(tmp_path / "hf"), vision_tower=str(tower)))
    report = json.loads((dst / "conversion_report.json").read_text())
    assert report["vision_tower"] == {
        "mm_vision_tower": TOWER_NAME,
        "weights": "source",
        "weight_files": [],
        "config": str(tower),
    }
    assert "differs from" in caplog.text  # the original would have loaded the tower it names instead
    model = AutoModelForImageTextToText.from_pretrained(dst)
    patch_embedding = model.model.vision_tower.embeddings.patch_embedding.weight
    assert torch.equal(patch_embedding, original.vision["embeddings.patch_embedding.weight"])


def test_source_without_projector_is_an_error(tmp_path, original):
    drop = [key for key in original.llava_state_dict(True) if key.startswith("model.mm_projector.")]
    src = write_original(tmp_path / "llava-med", original, vision_inside=True, drop=drop)
    with pytest.raises(ConversionError, match=r"no multimodal projector weights \(model\.mm_projector"):
        convert_llava_med(ConvertConfig(src=str(src), dst=str(tmp_path / "hf")))
    assert not (tmp_path / "hf").exists()


def test_missing_vision_tower_asks_for_vision_tower(tmp_path, original, tiny_preset):
    src = write_original(tmp_path / "llava-med", original, vision_inside=False)
    with pytest.raises(ConversionError, match=r"no vision tower weights.*pass --vision-tower DIR"):
        convert_llava_med(ConvertConfig(src=str(src), dst=str(tmp_path / "hf")))


def test_tower_without_preset_or_directory_asks_for_vision_tower(tmp_path, original):
    src = write_original(tmp_path / "llava-med", original, vision_inside=True)
    with pytest.raises(ConversionError, match=rf"{TOWER_NAME}.*not built in.*pass --vision-tower DIR"):
        convert_llava_med(ConvertConfig(src=str(src), dst=str(tmp_path / "hf")))


def test_unknown_and_missing_weights_are_listed(tmp_path, original, tiny_preset):
    src = write_original(
        tmp_path / "llava-med", original, vision_inside=True, drop=["model.layers.1.mlp.up_proj.weight"]
    )
    save_file({"model.mm_resampler.weight": torch.ones(2)}, src / "extra.safetensors")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.mm_resampler.weight"] = "extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError) as error:
        convert_llava_med(ConvertConfig(src=str(src), dst=str(tmp_path / "hf")))
    assert "unknown keys (not in LlavaForConditionalGeneration): model.language_model.mm_resampler.weight" in str(
        error.value
    )
    assert "missing keys (nothing in the source fills them): model.language_model.layers.1.mlp.up_proj.weight" in str(
        error.value
    )


def sentencepiece_only(directory: Path, legacy: bool | None) -> Path:
    """Replace the source's tokenizer files by a sentencepiece ``tokenizer.model`` (Llama's normalisation) and a
    LlamaTokenizer config for it, with ``legacy`` set or (None) left to transformers' default."""
    import sentencepiece

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)
    corpus = ["The heart is normal in size.", "There is a small left pleural effusion.", "The lungs are clear."]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 20),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",  # Llama / Mistral's settings
        remove_extra_whitespaces=False,
        split_digits=True,
        minloglevel=2,
    )
    (directory / "tokenizer.vocab").unlink()
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "model_max_length": 2048,
        "padding_side": "right",
    } | ({} if legacy is None else {"legacy": legacy})
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "tokenizer.model"


@pytest.mark.parametrize("legacy", [None, False, True])
def test_a_sentencepiece_only_tokenizer_encodes_prompts_as_llava_did(tmp_path, original, tiny_preset, legacy):
    """LLaVA-Med ships its Mistral tokenizer as tokenizer.model only: it loads (sentencepiece and protobuf are
    dependencies), and a prompt encodes as LLaVA's tokenizer_image_token encoded it: sentencepiece on each chunk
    between <image> markers, one BOS, <image> as one token. Whatever the config says of ``legacy``."""
    import sentencepiece

    src = write_original(tmp_path / "llava-med", original, vision_inside=True)
    model_file = sentencepiece_only(src, legacy)
    dst = convert_llava_med(ConvertConfig(src=str(src), dst=str(tmp_path / "hf")))
    processor = AutoProcessor.from_pretrained(dst)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    encode = sentencepiece.SentencePieceProcessor(model_file=str(model_file)).encode
    prompt = "[INST] <image>\nIs the heart normal in size? 12 mm. [/INST]"
    before, after = prompt.split("<image>")
    assert tokenizer(prompt).input_ids == [1, *encode(before), image_id, *encode(after)]
    # The processor expands <image> to one token per patch; the text around them encodes the same.
    expanded = processor(text=prompt, images=image((40, 30)), return_tensors="pt").input_ids[0].tolist()
    assert expanded == [1, *encode(before), *[image_id] * IMAGE_TOKENS, *encode(after)]
    assert image_id == 300 and tokenizer.pad_token == "<unk>"  # LLaVA pads with unk when there is no pad token


def test_existing_destination_is_kept_unless_overwrite(tmp_path, original, tiny_preset):
    src = write_original(tmp_path / "llava-med", original, vision_inside=True)
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "old.txt").write_text("previous model")
    with pytest.raises(ConversionError, match="exists; pass --overwrite"):
        convert_llava_med(ConvertConfig(src=str(src), dst=str(dst)))
    assert (dst / "old.txt").is_file()

    convert_llava_med(ConvertConfig(src=str(src), dst=str(dst), overwrite=True, dtype="bfloat16"))
    assert not (dst / "old.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf", "llava-med"]
    model = AutoModelForImageTextToText.from_pretrained(dst)
    assert model.dtype == torch.bfloat16
    assert json.loads((dst / "conversion_report.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ConversionError, match="overlaps the input"):
        convert_llava_med(ConvertConfig(src=str(src), dst=str(src / "converted"), overwrite=True))


def test_command_line_takes_src_and_dst_as_positional_arguments():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ConvertConfig)
    args = parser.parse_args(["orig", "out", "--vision-tower", "clip-336", "--dtype", "bfloat16", "--overwrite"])
    assert config_from_args(ConvertConfig, args) == ConvertConfig(
        src="orig", dst="out", vision_tower="clip-336", dtype="bfloat16", overwrite=True
    )
