"""Supervised fine-tuning in stages: answer-only loss, the loss falls, resume continues, weights reload exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

from mmed_rag.alignment.dataset import sequence_lengths
from mmed_rag.cli import main
from mmed_rag.data.records import read_conversations
from mmed_rag.training.sft import PathImageCollator, SFTConfig, conversation_rows, load_rows, stage_sources, train_sft


def conversations(world, path: Path, copies: int = 1) -> Path:
    """The phantom VQA test questions of both modalities as LLaVA instruct records (one turn each)."""
    records = []
    for modality in ("radiology", "pathology"):
        for line in (world.data / f"test/vqa/{modality}_test.jsonl").read_text().splitlines():
            row = json.loads(line)
            question = row["question"].replace("<image>", "").strip()
            records.append(
                {
                    "id": f"{modality}-{row['question_id']}",
                    "image": row["image"],
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": row["answer"]},
                    ],
                }
            )
    path.write_text(json.dumps(records * copies, indent=1))
    return path


def config(world, tmp_path: Path, data: Path, **overrides) -> SFTConfig:
    values = dict(
        model=str(world.llava),
        image_folder=str(world.images),
        output_dir=str(tmp_path / "sft"),
        data=(str(data),),
        max_steps=6,
        learning_rate=3e-3,
        batch_size=4,
        logging_steps=1,
        save_steps=1,
        warmup_ratio=0.0,
        max_length=256,
        plot=False,
    )
    return SFTConfig(**(values | overrides))


@pytest.fixture(scope="module")
def processor(world):
    return AutoProcessor.from_pretrained(world.llava)


def test_only_the_answer_tokens_carry_a_loss(world, tmp_path, processor):
    data = conversations(world, tmp_path / "c.json")
    rows, _ = load_rows(stage_sources(config(world, tmp_path, data).plan()[0], str(world.images))[0], "raise", 0)
    collator = PathImageCollator(processor=processor, max_length=None, completion_only_loss=True)
    batch = collator.torch_call([dict(row) for row in rows[:3]])
    for index, row in enumerate(rows[:3]):
        answer = row["completion"][0]["content"][0]["text"]
        labels, mask = batch["labels"][index], batch["attention_mask"][index].bool()
        kept = labels[labels != -100]
        assert processor.tokenizer.decode(kept, skip_special_tokens=True).strip().lower() == answer.strip().lower()
        # Token by token: every position before the answer, and all padding, is -100; the answer is its tokens.
        first = int((labels != -100).nonzero()[0])
        assert (labels[:first] == -100).all() and (labels[~mask] == -100).all()
        assert torch.equal(labels[first:][mask[first:]], batch["input_ids"][index][first:][mask[first:]])
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        assert (batch["input_ids"][index][:first] == image_token).sum() == 16  # the image is in the prompt
    # Rows start with the BOS every inference prompt starts with, and the length check counts what is collated.
    assert (batch["input_ids"][:, 0] == processor.tokenizer.bos_token_id).all() and (
        batch["labels"][:, 0] == -100
    ).all()
    lengths = sequence_lengths(rows[:3], processor, answers=("completion",))
    assert lengths == batch["attention_mask"].sum(dim=1).tolist()


class _Logits(TrainerCallback):
    """The trained model's logits on one batch, at the end of training (to compare with the reloaded model)."""

    def __init__(self, batch):
        self.batch, self.logits = batch, None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            self.logits = model.eval()(**self.batch).logits


def test_the_loss_falls_and_the_saved_model_reloads_to_identical_logits(world, tmp_path, processor, monkeypatch):
    data = conversations(world, tmp_path / "c.json", copies=3)
    val = conversations(world, tmp_path / "val.json")  # the same questions: their loss falls with the training loss
    run = config(world, tmp_path, data, max_steps=12, val_data=(str(val),), eval_steps=6, plot=True)
    rows, _ = load_rows(stage_sources(run.plan()[0], str(world.images))[0], "raise", 0)
    batch = PathImageCollator(processor=processor, max_length=None, completion_only_loss=True).torch_call(
        [dict(row) for row in rows[:2]]
    )
    batch.pop("labels")
    probe = _Logits(batch)
    import mmed_rag.training.sft as sft

    monkeypatch.setattr(sft, "StopOnDivergence", lambda stage: probe)  # ride along as the stage's callback
    result = train_sft(run)
    history = json.loads((result["final"] / "log_history.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    # From ln(vocabulary) = 6.6 down; the last three steps average 0.70x the first three (measured).
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    summary = result["summaries"]["sft"]
    val_losses = [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry]
    assert [step for step, _ in val_losses] == [0, 6, 12, 12]  # before, every 6 steps, after
    assert val_losses[0][1] == summary["val_loss_before"] and val_losses[-1][1] == summary["val_loss_after"]
    assert summary["val_loss_after"] < 0.8 * summary["val_loss_before"] and summary["val_rows"] == 8
    assert (result["final"] / "curves.png").read_bytes()[:4] == b"\x89PNG"
    reloaded = AutoModelForImageTextToText.from_pretrained(result["final"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, probe.logits, rtol=0, atol=0)
    vision = AutoModelForImageTextToText.from_pretrained(world.llava).model.vision_tower.state_dict()
    for name, value in reloaded.model.vision_tower.state_dict().items():  # "language_model": the tower is frozen
        assert torch.equal(value, vision[name]), name


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_an_interrupted_stage_continues_from_its_checkpoint_to_the_same_weights(world, tmp_path, monkeypatch):
    data = conversations(world, tmp_path / "c.json")
    straight = train_sft(config(world, tmp_path / "straight", data, val_data=(str(data),)))
    import mmed_rag.training.sft as sft

    run = config(world, tmp_path / "killed", data, val_data=(str(data),))
    with monkeypatch.context() as patch:
        patch.setattr(sft, "StopOnDivergence", lambda stage: _StopAt(3))
        with pytest.raises(KeyboardInterrupt):
            train_sft(run)
    assert (tmp_path / "killed/sft/checkpoints/sft/checkpoint-3").is_dir()
    resumed = train_sft(run)
    summary = resumed["summaries"]["sft"]
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["global_step"] == 6
    steps = [
        entry["step"] for entry in json.loads((resumed["final"] / "log_history.json").read_text()) if "loss" in entry
    ]
    assert steps == [1, 2, 3, 4, 5, 6]  # continued, not restarted
    # The val loss before is the starting weights' (measured before the checkpoint loads), after the trained ones'.
    before, after = (straight["summaries"]["sft"][key] for key in ("val_loss_before", "val_loss_after"))
    assert summary["val_loss_before"] == before and summary["val_loss_after"] == pytest.approx(after, abs=1e-5)
    expected = AutoModelForImageTextToText.from_pretrained(straight["final"]).state_dict()
    for name, value in AutoModelForImageTextToText.from_pretrained(resumed["final"]).state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    assert train_sft(run)["summaries"]["sft"] == summary  # finished: skipped


def test_a_multi_image_sample_trains(world, tmp_path):
    images = sorted(path.relative_to(world.images).as_posix() for path in (world.images / "radiology").glob("*.png"))
    record = {
        "id": "pair-0",
        "image": images[:2],
        "conversations": [
            {"from": "human", "value": "Current study: <image>\nPrior study: <image>\nHas the heart grown?"},
            {"from": "gpt", "value": "No."},
            {"from": "human", "value": "Is there an effusion?"},
            {"from": "gpt", "value": "Yes."},
        ],
    }
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([record] * 4))
    parsed = read_conversations(data).records[0]
    rows = conversation_rows(parsed, ["a.png", "b.png"])
    assert len(rows) == 2 and rows[1]["prompt"][-1]["role"] == "user"  # one row per answer, earlier turns as prompt
    assert [block["type"] for block in rows[0]["prompt"][0]["content"]] == ["text", "image", "text", "image", "text"]
    result = train_sft(config(world, tmp_path, data, max_steps=2, batch_size=2))
    assert result["summaries"]["sft"]["rows"] == 8 and result["summaries"]["sft"]["global_step"] == 2


def test_stages_from_yaml_each_start_from_the_last_and_lora_is_merged_forward(world, tmp_path, capsys):
    data = conversations(world, tmp_path / "c.json")
    preset = tmp_path / "sft.yaml"
    preset.write_text(
        yaml.safe_dump(
            {
                "model": str(world.llava),
                "image_folder": str(world.images),
                "output_dir": str(tmp_path / "out"),
                "batch_size": 4,
                "logging_steps": 1,
                "save_steps": 10,
                "max_length": 256,
                "lora_r": 4,
                "lora_alpha": 8,
                "stages": [
                    {"name": "align", "data": [str(data)], "max_steps": 2, "trainable": "projector"},
                    {
                        "name": "lora",
                        "data": [str(data), str(data)],
                        "mix": [1.0, 0.5],
                        "max_steps": 2,
                        "trainable": "lora",
                    },
                    {"name": "tune", "data": [str(data)], "max_steps": 1, "trainable": "language_model"},
                ],
            }
        )
    )
    assert main(["train-sft", "--config", str(preset)]) == 0
    out = tmp_path / "out"
    summaries = {name: json.loads((out / name / "stage.json").read_text()) for name in ("align", "lora", "tune")}
    assert summaries["align"]["starts_from"] == str(world.llava)
    assert (
        summaries["lora"]["starts_from"] == str(out / "align") and summaries["lora"]["rows"] == 12
    )  # 8 rows + half of 8
    assert (out / "lora/adapter_model.safetensors").is_file()
    assert summaries["tune"]["starts_from"] == str(out / "lora") and (out / "tune/model.safetensors").is_file()
    assert (out / "align/curves.png").read_bytes()[:4] == b"\x89PNG"
    base = AutoModelForImageTextToText.from_pretrained(world.llava).state_dict()
    aligned = AutoModelForImageTextToText.from_pretrained(out / "align").state_dict()
    changed = {name for name in base if not torch.equal(base[name], aligned[name])}
    assert changed and all("multi_modal_projector" in name for name in changed)  # "projector": nothing else moved


def test_stage_settings_are_checked_before_any_model_loads(world, tmp_path, capsys):
    preset = tmp_path / "bad.yaml"
    preset.write_text(yaml.safe_dump({"stages": [{"name": "a", "data": ["x.json", "y.json"], "mix": [1.0]}]}))
    assert main(["train-sft", "--config", str(preset)]) == 2
    assert "1 mix weight(s) for 2 data file(s)" in capsys.readouterr().err


def test_one_stage_options_and_a_stage_list_are_not_mixed():
    from mmed_rag.config import ConfigError

    with pytest.raises(ConfigError, match="either stages"):
        SFTConfig(data=("a.json",), stages=({"name": "a", "data": ["b.json"]},))


def test_a_row_longer_than_max_length_is_refused_before_any_model_loads(world, tmp_path, monkeypatch):
    import mmed_rag.training.sft as sft

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the length check")

    monkeypatch.setattr(sft, "load_stage_model", loaded)
    data = conversations(world, tmp_path / "c.json")
    with pytest.raises(sft.SFTError, match=r"record '(radiology|pathology)-\d+': \d+ tokens, over max_length 20"):
        train_sft(config(world, tmp_path, data, max_length=20))
