"""RAG-PT two-stage DPO on the tiny LLaVA: the rejected side really sees its own image, both stages train one
adapter and nothing else, outputs reload to the same logits, reruns resume, bad input is named."""

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, TrainerCallback

from mmed_rag.alignment.collator import RAGPreferenceCollator, pair_noise
from mmed_rag.alignment.dataset import load_preference_pairs, preference_dataset, user_text
from mmed_rag.alignment.dpo import lora_config, parse_dpo_args, train_dpo_2stages
from mmed_rag.alignment.dpo_config import PROJECTOR, DPOError, MMedRAGDPOConfig
from mmed_rag.alignment.original_flags import architecture_warnings
from mmed_rag.alignment.trainer import MMedRAGDPOTrainer
from mmed_rag.cli import main
from mmed_rag.config import ConfigError
from mmed_rag.data.images import open_image
from mmed_rag.data.records import RecordError
from mmed_rag.fingerprint import file_sha256
from mmed_rag.generation.generator import Generator, GeneratorConfig
from mmed_rag.testing import save_tiny_llava, tiny_llava, tiny_llava_config, tiny_processor
from mmed_rag.training.stages import StageMismatchError

REPO = Path(__file__).resolve().parents[1]
HUMAN = (
    "<image>\nYou are provided with a chest X-ray image, a image-related question and 1 reference report(s): "
    "1. The heart is normal in size. There is a small left pleural effusion. \n"
    "Please answer the question based on the image and report. Question: Is there a pleural effusion?"
)
# The settings of every tiny run: visible learning, LoRA r 8, two pairs a step.
TINY = dict(
    per_device_train_batch_size=2,
    learning_rate=1e-3,
    lora_r=8,
    lora_alpha=16,
    max_steps=2,
    warmup_steps=0,
    save_strategy="no",
    report_to="none",
    dataloader_num_workers=0,
    disable_tqdm=True,
)


def pair(index, image, *, chosen="Yes, there is an effusion.", rejected="No, there is no effusion.", **flags):
    """A preference record in the release's JSON format (both sides share the human turn)."""
    return {
        "id": f"pair-{index}",
        "image": image,
        "conversations": [{"from": "human", "value": HUMAN}, {"from": "gpt", "value": chosen}],
        "rejected_conversations": [{"from": "human", "value": HUMAN}, {"from": "gpt", "value": rejected}],
        **flags,
    }


def write_pairs(path, records):
    path.write_text(json.dumps(records, indent=4))
    return path


def phantom(seed, size=(48, 40)):
    """A small chest-like grey image: a bright ellipse (the heart) on a dark field, with noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: size[1], : size[0]]
    heart = ((x - size[0] * 0.55) / (size[0] * 0.2)) ** 2 + ((y - size[1] * 0.6) / (size[1] * 0.2)) ** 2 < 1
    pixels = 60 + 120 * heart + rng.normal(0, 12, heart.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny LLaVA on disk, six phantom images, stage-1 (cross-modality) and stage-2 pair files."""
    root = tmp_path_factory.mktemp("dpo")
    images = root / "images"
    (images / "cxr").mkdir(parents=True)
    for index in range(6):
        phantom(index).save(images / "cxr" / f"{index}.png")
    # Stage 1: image-only pairs on noised pairs (same answer on both sides) and clean answer pairs, alternating.
    stage1 = [
        pair(i, f"cxr/{i}.png", rejected_noised=1, rejected="Yes, there is an effusion.")
        if i % 2 == 0
        else pair(i, f"cxr/{i}.png", rejected_noised=0)
        for i in range(6)
    ]
    stage2 = [pair(i, f"cxr/{i}.png", rejected_noised=0, chosen="No.", rejected="Yes.") for i in range(6)]
    return SimpleNamespace(
        root=root,
        base=save_tiny_llava(root / "base"),
        images=images,
        stage1=write_pairs(root / "stage1.json", stage1),
        stage2=write_pairs(root / "stage2.json", stage2),
    )


def config(workspace, output_dir, **overrides) -> MMedRAGDPOConfig:
    paths = dict(
        model_name_or_path=str(workspace.base),
        data_path=str(workspace.stage1),
        stage2_data_path=str(workspace.stage2),
        image_folder=str(workspace.images),
        output_dir=str(output_dir),
    )
    return MMedRAGDPOConfig(**(paths | TINY | overrides))


# -- rows and batches -------------------------------------------------------------------------------------------


def test_pairs_become_trl_conversational_rows(workspace):
    dataset = preference_dataset(workspace.stage1, workspace.images)
    row = dataset[0]
    assert row["prompt"] == [{"role": "user", "content": user_text(HUMAN)}]
    assert "<image>" not in row["prompt"][0]["content"] and row["prompt"][0]["content"].startswith("You are")
    assert row["chosen"] == [{"role": "assistant", "content": "Yes, there is an effusion."}]
    assert row["images"] == [str((workspace.images / "cxr/0.png").resolve())]  # a path: decoded per batch
    assert [dataset[i]["rejected_noised"] for i in range(6)] == [1, 0, 1, 0, 1, 0]
    assert dataset["pair_index"] == list(range(6)) and dataset["chosen_noised"] == [0] * 6


def test_training_rows_start_like_the_inference_prompt(workspace):
    """BOS first, then exactly the tokens the generator feeds the model for the same human turn."""
    processor = tiny_processor()
    batch = RAGPreferenceCollator(processor)(list(preference_dataset(workspace.stage1, workspace.images))[:2])
    generator = Generator(tiny_llava(), processor, GeneratorConfig())
    image = open_image(workspace.images / "cxr/0.png")
    inference = processor(text=generator.render(HUMAN), images=[image], return_tensors="pt")
    prompt = inference["input_ids"][0]
    assert prompt[0] == processor.tokenizer.bos_token_id
    for row, completion in zip(batch["input_ids"], batch["completion_mask"], strict=True):
        assert torch.equal(row[: len(prompt)], prompt) and completion[: len(prompt)].sum() == 0
        assert completion[len(prompt)] == 1  # the answer starts right after the prompt


def test_rejected_half_of_pixel_values_is_the_rejected_image(workspace):
    processor = tiny_processor()
    rows = list(preference_dataset(workspace.stage1, workspace.images))[:2]  # pair 0 noised, pair 1 clean
    batch = RAGPreferenceCollator(processor, noise_seed=7)(rows)
    pixel_values = batch["pixel_values"]
    assert pixel_values.shape[0] == 4  # [chosen 0, chosen 1, rejected 0, rejected 1]

    def processed(image):
        return processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    real = [open_image(workspace.images / f"cxr/{i}.png") for i in (0, 1)]
    noise = pair_noise(real[0].size, 7, 0, "rejected")
    assert torch.equal(pixel_values[0], processed(real[0])) and torch.equal(pixel_values[1], processed(real[1]))
    assert torch.equal(pixel_values[2], processed(noise))  # the noised pair's rejected side: the noise image
    assert not torch.equal(pixel_values[2], pixel_values[0])
    assert torch.equal(pixel_values[3], pixel_values[1])  # the clean pair: the same image on both sides


def test_chosen_noised_pairs_noise_the_chosen_side(workspace, tmp_path):
    path = write_pairs(tmp_path / "chosen.json", [pair(0, "cxr/0.png", chosen_noised=1)])
    processor = tiny_processor()
    rows = list(preference_dataset(path, workspace.images))
    real = open_image(workspace.images / "cxr/0.png")

    def processed(image):
        return processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    chosen_only = RAGPreferenceCollator(processor)(rows)["pixel_values"]
    assert torch.equal(chosen_only[0], processed(pair_noise(real.size, 0, 0, "chosen")))
    assert torch.equal(chosen_only[1], processed(real))
    both = RAGPreferenceCollator(processor, chosen_noised_mode="both")(rows)["pixel_values"]  # the original's way
    assert torch.equal(both[0], both[1]) and torch.equal(both[0], chosen_only[0])


def test_noise_images_are_reproducible_per_pair():
    a, b = pair_noise((40, 30), 0, 3, "rejected"), pair_noise((40, 30), 0, 3, "rejected")
    assert a.size == (40, 30) and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(pair_noise((40, 30), 0, 4, "rejected")))
    pixels = np.asarray(a)
    assert 0.4 < (pixels == 0).mean() < 0.6  # MMed-RAG's clipped N(0, 1): about half black


def test_the_dpo_loss_depends_on_the_rejected_image(workspace, tmp_path):
    """Image-only pair (same answer on both sides): a real rejected image gives margin 0, the noise image does not."""
    processor = tiny_processor()
    model = AutoModelForImageTextToText.from_pretrained(workspace.base)
    clean = write_pairs(tmp_path / "clean.json", [pair(0, "cxr/0.png", rejected="Yes, there is an effusion.")])
    noised = write_pairs(
        tmp_path / "noised.json", [pair(0, "cxr/0.png", rejected="Yes, there is an effusion.", rejected_noised=1)]
    )
    dataset = preference_dataset(noised, workspace.images)
    trainer = MMedRAGDPOTrainer(
        model=model,
        args=MMedRAGDPOConfig(output_dir=str(tmp_path / "out"), **TINY),
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora_config(MMedRAGDPOConfig(lora_r=8, lora_alpha=16)),
    )
    with torch.no_grad():  # move the policy away from the reference (LoRA B starts at zero)
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    losses = []
    for path in (clean, noised):
        batch = trainer.data_collator(list(preference_dataset(path, workspace.images)))
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # identical rows: chosen and rejected score alike
    assert abs(losses[1] - math.log(2)) > 1e-4  # the rejected side scored on the noise image


def test_the_fused_head_projects_answer_tokens_only_with_the_full_logits_numbers(workspace, tmp_path, monkeypatch):
    """On a CPU trl's head would project every position; ours projects the answer tokens, to the same log-probs and
    gradients as the model's own full logits."""
    from trl.kernels import ChunkedLogProbFunction

    trainer = MMedRAGDPOTrainer(
        model=AutoModelForImageTextToText.from_pretrained(workspace.base),
        args=MMedRAGDPOConfig(output_dir=str(tmp_path / "out"), **TINY),
        train_dataset=preference_dataset(workspace.stage1, workspace.images),
        processing_class=tiny_processor(),
        peft_config=lora_config(MMedRAGDPOConfig(lora_r=8, lora_alpha=16)),
    )
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    batch = trainer.data_collator(list(preference_dataset(workspace.stage1, workspace.images))[:2])
    inputs = {key: value for key, value in batch.items() if key != "completion_mask"}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    lora = [param for name, param in trainer.model.named_parameters() if "lora_B" in name]

    projected = []
    apply = ChunkedLogProbFunction.apply
    monkeypatch.setattr(ChunkedLogProbFunction, "apply", lambda *args: projected.append(len(args[0])) or apply(*args))
    fused = trainer.model(**inputs, labels=labels, fused_lm_head=True).log_probs
    fused_grads = torch.autograd.grad(fused.sum(), lora)

    logits = trainer.model(**inputs).logits[:, :-1].float()
    mask = labels[:, 1:] != -100
    full = logits.log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    full_grads = torch.autograd.grad(full.sum(), lora)

    assert projected == [int(mask.sum())] and int(mask.sum()) < mask.numel() / 4  # answers only, not prompts
    torch.testing.assert_close(fused, full, atol=1e-5, rtol=1e-5)
    for ours, reference in zip(fused_grads, full_grads, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_a_head_that_caps_its_logits_keeps_trls_forward():
    """Soft-capped or scaled logits are trl's to reproduce: the answer-token head steps aside for them."""
    from mmed_rag.alignment.answer_logprobs import score_answer_tokens_only

    model = tiny_llava()
    plain = model.forward
    assert score_answer_tokens_only(model) and model.forward != plain
    capped = tiny_llava()
    capped.config.text_config.final_logit_softcapping = 30.0
    original = capped.forward
    assert not score_answer_tokens_only(capped) and capped.forward == original


# -- two stages on the tiny LLaVA ---------------------------------------------------------------------------------


class Recorder(TrainerCallback):
    """What each stage's trainer holds at its start and end (weights, adapters, optimizer groups)."""

    def __init__(self):
        self.begin, self.end = {}, {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        stage = Path(args.output_dir).name
        self.begin[stage] = {
            "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "adapters": list(model.peft_config),
            "groups": [(group["initial_lr"], len(group["params"])) for group in optimizer.param_groups],
        }

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.end[Path(args.output_dir).name] = model


@pytest.fixture(scope="module")
def trained(workspace):
    """Both stages, 2 steps each, and the merged model: the run the tests below inspect."""
    recorder = Recorder()
    base_sha = file_sha256(workspace.base / "model.safetensors")
    run = config(workspace, workspace.root / "run", merge=True)
    result = train_dpo_2stages(run, callbacks=[recorder])
    return SimpleNamespace(config=run, result=result, recorder=recorder, base_sha=base_sha)


def base_weights(peft_model) -> dict[str, torch.Tensor]:
    """The base model's own parameters under a peft model, by their plain names (no LoRA, no trained copies)."""
    weights = {}
    for name, param in peft_model.get_base_model().named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        weights[name.replace(".base_layer", "").replace(".original_module", "")] = param.detach()
    return weights


def test_stage1_trains_lora_and_the_projector_copy_only(workspace, trained):
    original = AutoModelForImageTextToText.from_pretrained(workspace.base)
    assert file_sha256(workspace.base / "model.safetensors") == trained.base_sha  # the base on disk
    policy = trained.recorder.end["stage1"]
    in_memory = base_weights(policy)  # the base under the adapter, incl. the reference projector
    assert in_memory.keys() == dict(original.named_parameters()).keys()
    assert all(torch.equal(in_memory[name], param) for name, param in original.named_parameters())

    saved = load_file(trained.result["stage1"] / "adapter_model.safetensors")
    lora_b = [value for key, value in saved.items() if "lora_B" in key]
    assert lora_b and all(value.abs().sum() > 0 for value in lora_b)  # LoRA B starts at zero
    assert not any("vision_tower" in key or "lm_head" in key for key in saved)
    projector = {key: value for key, value in saved.items() if PROJECTOR in key}
    assert len(projector) == 4  # linear_1/linear_2 weight and bias: the trained copy travels with the adapter
    for key, value in projector.items():
        name = key.removeprefix("base_model.model.")
        assert not torch.equal(value, original.get_parameter(name))  # trained ...
    trainable = trained.recorder.begin["stage1"]["weights"]
    assert all(PROJECTOR in name or "lora_" in name for name in trainable)
    # ... at its own learning rate, after the LoRA group (the logged learning_rate is the LoRA one).
    groups = trained.recorder.begin["stage1"]["groups"]
    assert groups[0][0] == 1e-3 and {lr for lr, _ in groups[1:]} == {2e-5}


def test_stage2_continues_the_stage1_adapter_against_the_base(trained):
    begin = trained.recorder.begin["stage2"]
    assert begin["adapters"] == ["default"]  # trl's frozen "ref" copy removed: reference = adapter disabled
    stage1 = load_file(trained.result["stage1"] / "adapter_model.safetensors")
    starting = {
        name.replace(".default", "").replace(".modules_to_save", ""): value for name, value in begin["weights"].items()
    }
    assert starting.keys() == stage1.keys()
    assert all(torch.equal(starting[key], value) for key, value in stage1.items())
    stage2 = load_file(trained.result["stage2"] / "adapter_model.safetensors")
    assert any(not torch.equal(stage2[key], value) for key, value in stage1.items())
    summary = trained.result["metrics"]["stage2"]
    assert summary["start_adapter"] == str(trained.result["stage1"]) and summary["global_step"] == 2
    first_step = json.loads((trained.result["stage2"] / "log_history.json").read_text())[0]
    assert first_step["rewards/margins"] != 0  # the base reference differs from the stage-1 policy from step 1


def model_inputs(workspace):
    processor = tiny_processor()
    generator = Generator(tiny_llava(), processor, GeneratorConfig())
    image = open_image(workspace.images / "cxr/1.png")
    return processor(text=generator.render(HUMAN) + " Yes", images=[image], return_tensors="pt")


def test_saved_adapter_reloads_to_the_same_logits(workspace, trained):
    inputs = model_inputs(workspace)
    policy = trained.recorder.end["stage2"].eval()
    generator = Generator.load(
        GeneratorConfig(model=str(workspace.base), adapter=str(trained.result["stage2"]), dtype="float32")
    )
    with torch.no_grad():
        trained_logits = policy(**inputs).logits
        reloaded = generator.model(**inputs).logits
        base = AutoModelForImageTextToText.from_pretrained(workspace.base)(**inputs).logits
    assert (trained_logits - reloaded).abs().max() <= 1e-6
    assert (trained_logits - base).abs().max() > 1e-4  # and the adapter does change the model


def test_merged_model_gives_base_plus_adapter_logits(workspace, trained):
    from peft import PeftModel

    inputs = model_inputs(workspace)
    merged_dir = trained.result["merged"]
    assert merged_dir == Path(trained.config.output_dir) / "merged"
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir)
    base = AutoModelForImageTextToText.from_pretrained(workspace.base)
    with_adapter = PeftModel.from_pretrained(base, trained.result["stage2"]).eval()
    with torch.no_grad():
        assert (merged(**inputs).logits - with_adapter(**inputs).logits).abs().max() <= 1e-5
    assert json.loads((merged_dir / "merge.json").read_text())["adapter"] == str(trained.result["stage2"])
    # `mmed-rag merge-lora` on its own, into a fresh directory, gives the same weights.
    again = workspace.root / "merged-again"
    command = ["merge-lora", "--base", str(workspace.base), "--adapter", str(trained.result["stage2"])]
    assert main([*command, "--out", str(again)]) == 0
    first, second = load_file(merged_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_each_stage_directory_is_complete(trained):
    for stage in ("stage1", "stage2"):
        directory = trained.result[stage]
        names = set(os.listdir(directory))
        assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json", "tokenizer.json"} <= names
        assert {"dpo_config.json", "log_history.json", "stage.json", "curves.png"} <= names
        assert "ref" not in names  # only the trained adapter is saved
        assert (directory / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        saved_config = json.loads((directory / "dpo_config.json").read_text())
        assert saved_config["lora_r"] == 8 and saved_config["beta"] == 0.1 and saved_config["loss_type"] == ["sigmoid"]
        logged = json.loads((directory / "log_history.json").read_text())
        assert [entry["step"] for entry in logged if "loss" in entry] == [1, 2]
        assert not (Path(trained.config.output_dir) / f"{stage}.partial").exists()


def test_rerun_skips_finished_stages_and_refuses_other_data(workspace, trained):
    recorder = Recorder()
    marker = trained.result["stage1"] / "stage.json"
    written = marker.stat().st_mtime_ns
    again = train_dpo_2stages(config(workspace, trained.config.output_dir), callbacks=[recorder])
    assert recorder.begin == {} and marker.stat().st_mtime_ns == written  # nothing trained, nothing rewritten
    assert again["metrics"] == trained.result["metrics"]
    other = write_pairs(workspace.root / "other.json", [pair(i, f"cxr/{i}.png", chosen="Maybe.") for i in range(4)])
    with pytest.raises(StageMismatchError, match=r"stage1 was made with other inputs.*data_sha256"):
        train_dpo_2stages(config(workspace, trained.config.output_dir, data_path=str(other)))


class StopAtStep(TrainerCallback):
    """Stands in for a kill: the run stops with an error when a step is about to start."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed before step {self.step + 1}")


def test_an_interrupted_stage_resumes_from_its_last_checkpoint(workspace, tmp_path):
    run = config(workspace, tmp_path / "run", stage="1", max_steps=3, save_strategy="steps", save_steps=1, plot=False)
    with pytest.raises(KeyboardInterrupt):
        train_dpo_2stages(run, callbacks=[StopAtStep(2)])
    assert (tmp_path / "run/checkpoints/stage1/checkpoint-2").is_dir() and not (tmp_path / "run/stage1").exists()
    result = train_dpo_2stages(run)
    summary = result["metrics"]["stage1"]
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 3
    logged = json.loads((result["stage1"] / "log_history.json").read_text())
    assert [entry["step"] for entry in logged if "loss" in entry] == [1, 2, 3]


def test_stage2_reference_can_be_the_stage1_adapter(workspace, trained, tmp_path):
    """trl's default for a loaded adapter: its frozen copy is the reference, so step 1 starts at loss ln 2."""
    from peft import PeftModel

    dataset = preference_dataset(workspace.stage2, workspace.images)
    losses = {}
    for reference in ("stage1", "base"):
        model = PeftModel.from_pretrained(
            AutoModelForImageTextToText.from_pretrained(workspace.base), trained.result["stage1"], is_trainable=True
        )
        trainer = MMedRAGDPOTrainer(
            model=model,
            args=MMedRAGDPOConfig(output_dir=str(tmp_path / reference), stage2_reference=reference, **TINY),
            train_dataset=dataset,
            processing_class=tiny_processor(),
        )
        assert ("ref" in trainer.model.peft_config) == (reference == "stage1")
        with torch.no_grad():
            losses[reference] = trainer.compute_loss(trainer.model, trainer.data_collator(list(dataset)[:2])).item()
    assert losses["stage1"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(losses["base"] - math.log(2)) > 1e-5


# -- command line, presets, architecture flags ------------------------------------------------------------------

ORIGINAL_FLAGS = (
    "--deepspeed ./scripts/zero3.json --version v1 --lora_enable True --lora_r 128 --lora_alpha 256 "
    "--mm_projector_lr 2e-5 --vision_tower openai/clip-vit-large-patch14-336 --mm_projector_type mlp2x_gelu "
    "--mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False --image_aspect_ratio pad "
    "--group_by_modality_length True --bf16 False --num_train_epochs 3 --per_device_train_batch_size 1 "
    "--per_device_eval_batch_size 1 --gradient_accumulation_steps 1 --evaluation_strategy no --save_strategy steps "
    "--save_steps 200 --save_total_limit 1 --learning_rate 1e-7 --weight_decay 0. --warmup_ratio 0.03 "
    "--lr_scheduler_type cosine --logging_steps 1 --report_to none --tf32 True --model_max_length 1024 "
    "--gradient_checkpointing True --dataloader_num_workers 4 --lazy_preprocess True"
).split()


def test_the_original_command_line_is_accepted(tmp_path):
    flags = [flag for flag in ORIGINAL_FLAGS if flag not in ("--deepspeed", "./scripts/zero3.json")]
    parsed = parse_dpo_args(
        ["--model_name_or_path", "m", "--data_path", "d.json", "--image_folder", "i", "--output_dir", str(tmp_path)]
        + flags
        + ["--local_rank=0"]
    )
    assert parsed.eval_strategy == "no" and parsed.warmup_steps == 0.03 and parsed.max_length == 1024
    assert parsed.tf32 is None and parsed.bf16 is False  # --tf32 True dropped without a GPU
    assert (parsed.lora_r, parsed.lora_alpha, parsed.mm_projector_lr, parsed.learning_rate) == (128, 256, 2e-5, 1e-7)
    assert parsed.gradient_checkpointing is True and parsed.local_rank == 0
    assert parsed.stages == ["1"]  # one --data_path: one stage, as the original
    assert parse_dpo_args(["--lora_checkpoint_path", "a", "--data_path", "d"]).stages == ["2"]
    assert parse_dpo_args(["--data_path", "a", "--stage2_data_path", "b"]).stages == ["1", "2"]
    with pytest.raises(ConfigError, match="--no_such_flag"):
        parse_dpo_args(["--no_such_flag", "1"])


def test_yaml_presets_are_defaults_that_flags_override(tmp_path):
    preset = REPO / "configs/dpo/vqa.yaml"
    parsed = parse_dpo_args(["--config", str(preset), "--learning_rate", "3e-7", "--output_dir", str(tmp_path)])
    assert parsed.learning_rate == 3e-7 and parsed.stage2_learning_rate == 2e-7 and parsed.lora_r == 128
    for name in ("radiology_report.yaml", "vqa.yaml", "phantoms.yaml"):
        parse_dpo_args(["--config", str(REPO / "configs/dpo" / name), "--output_dir", str(tmp_path)])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: 8\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown option\(s\) lora_rank"):
        parse_dpo_args(["--config", str(bad)])


def test_architecture_flags_are_checked_against_the_model():
    model, processor = tiny_llava(), tiny_processor()
    matching = MMedRAGDPOConfig(
        mm_vision_select_layer=-2,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_feature="patch",
        version="mistral_instruct",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="square",
    )
    assert architecture_warnings(matching, model, processor) == []
    original = MMedRAGDPOConfig(
        mm_vision_select_layer=-1,
        mm_projector_type="linear",
        vision_tower="openai/clip-vit-large-patch14-336",
        version="v1",
        image_aspect_ratio="pad",
        mm_use_im_start_end=True,
        group_by_modality_length=True,
    )
    found = " | ".join(architecture_warnings(original, model, processor))
    for flag in (
        "mm_vision_select_layer",
        "mm_projector_type",
        "vision_tower",
        "version",
        "image_aspect_ratio",
        "mm_use_im_start_end",
        "group_by_modality_length",
    ):
        assert f"--{flag}" in found
    assert "'patch_size': 14, 'image_size': 336" in found


def test_unsupported_original_options_are_refused():
    with pytest.raises(ConfigError, match="bits: 4-bit"):
        MMedRAGDPOConfig(bits=4)
    with pytest.raises(ConfigError, match="lora_enable: full fine-tuning"):
        MMedRAGDPOConfig(lora_enable=False)


# -- bad input ------------------------------------------------------------------------------------------------


def bad_record(kind, index):
    record = pair(index, "cxr/0.png", rejected_noised=1)
    if kind == "no rejected answer":
        record["rejected_conversations"] = record["rejected_conversations"][:1]
    elif kind == "two image markers":
        for side in ("conversations", "rejected_conversations"):
            record[side][0]["value"] = HUMAN + "\n<image>"
    elif kind == "missing image":
        record["image"] = "cxr/missing.png"
    elif kind == "image outside the folder":
        record["image"] = "../base/config.json"
    elif kind == "text-only record":
        del record["image"]
    elif kind == "different human turns":
        record["rejected_conversations"][0]["value"] = HUMAN.replace("effusion?", "nodule?")
    return record


@pytest.mark.parametrize(
    ("kind", "field_name", "problem"),
    [
        ("no rejected answer", "rejected_conversations", "expected at least one 'gpt' turn"),
        ("two image markers", "conversations[0].value", "has 2 <image> markers but the record has 1 image"),
        ("missing image", "image", "image file not found"),
        ("image outside the folder", "image", "leads outside the image root"),
        ("text-only record", "image", "rejected_noised/chosen_noised need the real image"),
        ("different human turns", "rejected_conversations[0].value", "both sides of a pair must share"),
    ],
)
def test_bad_pairs_are_named_by_file_record_and_field(workspace, tmp_path, kind, field_name, problem):
    path = write_pairs(tmp_path / "pairs.json", [pair(0, "cxr/0.png"), bad_record(kind, 1)])
    with pytest.raises(RecordError) as error:
        load_preference_pairs(path, workspace.images)
    assert error.value.path == str(path) and error.value.position.startswith("record 1 ")
    assert error.value.field == field_name and problem in str(error.value)
    skipped = load_preference_pairs(path, workspace.images, on_error="skip")  # the good pair stays
    assert [row["pair_index"] for row in skipped.rows] == [0] and len(skipped.errors) == 1


def test_a_pair_longer_than_max_length_is_refused_not_cut(workspace, tmp_path):
    long_answer = " ".join(["the heart is normal in size ."] * 40)
    path = write_pairs(tmp_path / "long.json", [pair(0, "cxr/0.png"), pair(1, "cxr/1.png", chosen=long_answer)])
    processor = tiny_processor()
    lengths = [len(row) for row in load_preference_pairs(path, workspace.images, processor=processor).rows]
    assert lengths == [len(load_preference_pairs(path, workspace.images).rows[0])] * 2  # no limit: both kept
    with pytest.raises(
        RecordError,
        match=r"long\.json, record 1 \(line \d+\): field 'conversations': the pair is "
        r"\d+ tokens .* over max_length 200",
    ):
        load_preference_pairs(path, workspace.images, processor=processor, max_length=200)
    kept = load_preference_pairs(path, workspace.images, processor=processor, max_length=200, on_error="skip")
    assert [row["pair_index"] for row in kept.rows] == [0]


def test_measured_length_is_the_collated_length(workspace):
    from mmed_rag.alignment.dataset import sequence_lengths

    processor = tiny_processor()
    rows = load_preference_pairs(workspace.stage1, workspace.images).rows[:1]
    batch = RAGPreferenceCollator(processor)(rows)
    assert sequence_lengths(rows, processor) == [int(batch["attention_mask"].sum(dim=1).max())]


def test_stage2_without_a_stage1_adapter_is_an_error(workspace, tmp_path):
    with pytest.raises(DPOError, match=r"stage 2 continues the stage-1 LoRA adapter.*--stage1_adapter"):
        train_dpo_2stages(config(workspace, tmp_path / "run", stage="2"))
    with pytest.raises(DPOError, match=r"nowhere has no adapter_config\.json"):
        train_dpo_2stages(config(workspace, tmp_path / "run", lora_checkpoint_path=str(tmp_path / "nowhere")))


# -- the released pair files ------------------------------------------------------------------------------------


def test_released_pair_files_train_end_to_end(release_dir, tmp_path):
    """The first records of two released files (2 noised, 2 clean pairs each) on blank stand-in images, 2 steps each."""
    alignment = release_dir / "training/alignment"
    images = tmp_path / "images"
    files, prompts = {}, []
    for stage, name in (("stage1", "radiology/radiology_report.json"), ("stage2", "ophthalmology/harvard_vqa.json")):
        records = json.loads((alignment / name).read_text())
        noised = [record for record in records if record.get("rejected_noised") == 1][:2]
        clean = [record for record in records if record.get("rejected_noised") == 0][:2]
        for record in noised + clean:
            (images / record["image"]).parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (64, 64), 128).save(images / record["image"])
            prompts.append(user_text(record["conversations"][0]["value"]))
        files[stage] = write_pairs(tmp_path / f"{stage}.json", noised + clean)
    processor = tiny_processor()
    assert max(len(ids) for ids in processor.tokenizer(prompts)["input_ids"]) > 100  # the reports make them long
    base = save_tiny_llava(tmp_path / "base")
    assert tiny_llava_config().text_config.max_position_embeddings >= 1024
    run = MMedRAGDPOConfig(
        model_name_or_path=str(base),
        data_path=str(files["stage1"]),
        stage2_data_path=str(files["stage2"]),
        image_folder=str(images),
        output_dir=str(tmp_path / "run"),
        model_max_length=1024,
        **(TINY | {"plot": False}),
    )
    result = train_dpo_2stages(run)
    for stage in ("stage1", "stage2"):
        summary = result["metrics"][stage]
        assert summary["pairs"] == 4 and summary["noised_pairs"] == 2 and summary["global_step"] == 2  # one epoch
        logged = json.loads((result[stage] / "log_history.json").read_text())
        assert all(entry["logps/chosen"] < 0 for entry in logged if "loss" in entry)  # answers were scored
    shutil.rmtree(tmp_path / "run")
