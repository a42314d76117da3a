"""A training run whose numbers become NaN or infinite stops with one line and publishes nothing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmed_rag.cli import main
from mmed_rag.divergence import DivergedError, StopOnDivergence
from mmed_rag.domain import classifier


def one_error_line(err: str, stage: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("mmed-rag ")]
    assert len(lines) == 1 and lines[0].startswith(f"mmed-rag {stage}: "), err
    assert "Traceback" not in err
    return lines[0]


def test_finetune_clip_at_lr_1e9_stops_and_publishes_no_best(world, tmp_path, capsys):
    code = main(
        [
            *("finetune-clip", "--model", "tiny-clip", "--train-data", str(world.corpus), "--dataset-type"),
            *("radiology", "--img-root", str(world.images), "--epochs", "2", "--batch-size", "4", "--workers", "0"),
            *("--lr", "1e9", "--warmup", "1", "--logs", str(tmp_path), "--name", "run", "--device", "cpu"),
        ]
    )
    line = one_error_line(capsys.readouterr().err, "finetune-clip")
    assert code == 2
    assert "finetune-clip diverged" in line and "epoch 1" in line and "learning rate 1e+09" in line
    assert not (tmp_path / "run/best").exists() and not (tmp_path / "run/last").exists()


def test_train_domain_stops_on_a_nan_loss(world, tmp_path, monkeypatch, capsys):
    forward = classifier.DomainHead.forward
    calls = []

    def nan_in_epoch_2(self, features):
        calls.append(self.training)
        logits = forward(self, features)
        return logits * math.nan if sum(calls) > 1 and self.training else logits

    monkeypatch.setattr(classifier.DomainHead, "forward", nan_in_epoch_2)
    files = [f"{m}={world.data}/training/retriever/{m}/{m}_train.json" for m in ("radiology", "pathology")]
    code = main(
        [
            *("train-domain", "--train-files", *files, "--img-root", str(world.images), "--model", "tiny-clip"),
            *("--epochs", "3", "--out", str(tmp_path / "domain"), "--device", "cpu"),
        ]
    )
    line = one_error_line(capsys.readouterr().err, "train-domain")
    assert code == 2 and "train-domain diverged: the loss is nan at epoch 2, step 1" in line
    assert not (tmp_path / "domain").exists()


def test_train_dpo_stops_on_a_nan_loss_before_publishing_the_stage(world, tmp_path, monkeypatch, capsys):
    from mmed_rag.alignment.trainer import MMedRAGDPOTrainer

    compute_loss, calls = MMedRAGDPOTrainer.compute_loss, []

    def nan_at_step_2(self, *args, **kwargs):
        calls.append(1)
        loss = compute_loss(self, *args, **kwargs)
        return loss * math.nan if len(calls) == 2 else loss

    monkeypatch.setattr(MMedRAGDPOTrainer, "compute_loss", nan_at_step_2)
    code = main(
        [
            *("train-dpo", "--model_name_or_path", str(world.llava), "--data_path", str(world.pairs)),
            *("--image_folder", str(world.images), "--output_dir", str(tmp_path / "dpo"), "--max_steps", "3"),
            *("--per_device_train_batch_size", "1", "--lora_r", "4", "--lora_alpha", "8", "--bf16", "False"),
            *("--gradient_checkpointing", "False", "--report_to", "none", "--save_strategy", "steps"),
            *("--save_steps", "1"),
        ]
    )
    line = one_error_line(capsys.readouterr().err, "train-dpo")
    assert code == 2 and "train-dpo stage 1 diverged: non-finite gradients of" in line and "at step 2" in line
    assert not (tmp_path / "dpo/stage1").exists()
    # The step-1 checkpoint is finite; nothing of step 2 was saved, so a rerun resumes from a finite state.
    checkpoints = sorted(path.name for path in (tmp_path / "dpo/checkpoints/stage1").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-1"]


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))


def test_the_trainer_callback_checks_weights_gradients_and_logged_numbers():
    callback, model = StopOnDivergence("train-sft"), _Tiny()
    state, optimizer = SimpleNamespace(global_step=4), SimpleNamespace(param_groups=[{"lr": 0.5}])
    callback.on_train_begin(None, state, None, model=model, optimizer=optimizer)
    model.weight.grad = torch.tensor([0.0, math.inf, 1.0])
    with pytest.raises(DivergedError, match=r"train-sft diverged: non-finite gradients of weight at step 5, learning"):
        callback.on_pre_optimizer_step(None, state, None, model=model, optimizer=optimizer)
    with pytest.raises(DivergedError, match="the logged loss is nan at step 4"):
        callback.on_log(None, state, None, logs={"loss": math.nan, "learning_rate": 0.5})
    callback.on_log(None, state, None, logs={"loss": 0.7, "grad_norm": 1.0})
    with torch.no_grad():
        model.weight[0] = math.nan
    with pytest.raises(DivergedError, match="non-finite weights in weight at the start"):  # a resumed NaN state
        callback.on_train_begin(None, state, None, model=model, optimizer=optimizer)


def test_a_diverged_retriever_builds_no_index_and_nan_queries_find_nothing(world, tmp_path, capsys):
    from mmed_rag.retrieval.clip import save_clip
    from mmed_rag.retrieval.index import ReportIndex
    from mmed_rag.retrieval.ranking import NonFiniteScoresError
    from mmed_rag.testing import tiny_clip

    model = tiny_clip(0)[0]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(math.nan)
    save_clip(model, tmp_path / "nan-clip", "tiny-clip")
    argv = ["build-index", "--retriever", str(tmp_path / "nan-clip"), "--corpus", str(world.corpus)]
    code = main([*argv, "--modality", "radiology", "--out", str(tmp_path / "index"), "--device", "cpu"])
    line = one_error_line(capsys.readouterr().err, "build-index")
    assert code == 2 and "NaN or infinite" in line and "no index is built" in line
    assert not (tmp_path / "index").exists()
    index = ReportIndex.load(world.index)
    with pytest.raises(NonFiniteScoresError, match="query embeddings"):
        index.search(np.full((2, index.embed_dim), np.nan, dtype=np.float32), 3)
