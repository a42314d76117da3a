"""Runs that used to exit 0 with a plausible, wrong result: each now counts, refuses or explains.

Each test reproduces one case as a user met it (on phantoms with tiny models) and asserts the new behaviour.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmed_rag.adapters import AdapterError, load_lora
from mmed_rag.cli import main


def one_error_line(err: str, stage: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("mmed-rag ")]
    assert len(lines) == 1 and lines[0].startswith(f"mmed-rag {stage}: ") and "Traceback" not in err, err
    return lines[0]


def many_questions(world, tmp: Path, copies: int = 5) -> list[str]:
    rows = [json.loads(line) for line in world.vqa.read_text().splitlines()] * copies
    return [json.dumps({**row, "question_id": index}) for index, row in enumerate(rows)]


def retrieve_argv(world, source: Path, output: Path, *more: str) -> list[str]:
    return [
        *("retrieve", "--eval_json", str(source), "--output_path", str(output), "--img_root", str(world.images)),
        *("--index", str(world.index), "--model_name_or_path", str(world.clip), "--device", "cpu", *more),
    ]


def generate_argv(world, source: Path, output: Path, *more: str) -> list[str]:
    return [
        *("generate", "--model", str(world.llava), "--no-retrieval", "--modality", "radiology"),
        *("--input", str(source), "--output", str(output), "--img-root", str(world.images)),
        *("--max-new-tokens", "2", "--device", "cpu", *more),
    ]


# -- 1. skipped records are counted, with their position -------------------------------------------------------


@pytest.mark.parametrize("stage", ["retrieve", "generate"])
@pytest.mark.parametrize("damage", ["line cut mid-string", "non-UTF-8 byte"])
def test_a_record_the_reader_skips_is_counted_and_named(stage, damage, world, tmp_path, capsys):
    lines = many_questions(world, tmp_path)
    if damage == "line cut mid-string":
        lines[2] = lines[2][:40]
        data = "\n".join(lines).encode() + b"\n"
    else:
        data = "\n".join(lines).encode().replace(b'"question_id": 2,', b'"question_id": 2, "note": "\xff",') + b"\n"
    source = tmp_path / "questions.jsonl"
    source.write_bytes(data)
    build = retrieve_argv if stage == "retrieve" else generate_argv
    assert main(build(world, source, tmp_path / "out.jsonl", "--on-error", "skip")) == 0
    out = capsys.readouterr().out
    assert f"wrote {len(lines) - 1} " in out and "1 skipped" in out
    assert "skipped: " in out and "questions.jsonl, line 3" in out
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == len(lines) - 1


def test_a_list_cut_short_says_the_rest_was_lost(world, tmp_path, capsys):
    records = json.loads(world.report.read_text()) * 3
    source = tmp_path / "reports.json"
    text = json.dumps([{**record, "id": f"r{index}"} for index, record in enumerate(records)], indent=2)
    source.write_text(text[: len(text) // 2])
    assert main(retrieve_argv(world, source, tmp_path / "out.jsonl", "--on-error", "skip")) == 0
    out = capsys.readouterr().out
    assert "1 skipped" in out and "reading stopped here" in out and "reports.json, record" in out


# -- 2. an adapter that does not fit its model is an error, not the base model --------------------------------


@pytest.fixture(scope="module")
def adapters(world, tmp_path_factory):
    """A LoRA adapter of the tiny LLaVA with non-zero weights, and a copy with renamed tensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("adapters")
    model = AutoModelForImageTextToText.from_pretrained(world.llava)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(root / "good")
    renamed = root / "renamed"
    renamed.mkdir()
    (renamed / "adapter_config.json").write_text((root / "good/adapter_config.json").read_text())
    tensors = load_file(root / "good/adapter_model.safetensors")
    save_file(
        {name.replace("language_model", "lang_model"): value for name, value in tensors.items()},
        renamed / "adapter_model.safetensors",
    )
    return root / "good", renamed


def test_an_adapter_with_foreign_tensor_names_is_refused_by_name(world, adapters):
    from transformers import AutoModelForImageTextToText

    good, renamed = adapters
    load_lora(AutoModelForImageTextToText.from_pretrained(world.llava), good)  # loads, every tensor checked
    with pytest.raises(AdapterError, match=r"match no layer of the model \(base_model\.model\.model\.lang_model"):
        load_lora(AutoModelForImageTextToText.from_pretrained(world.llava), renamed)


def test_generate_and_merge_lora_refuse_an_adapter_that_does_not_fit(world, adapters, tmp_path, capsys):
    _, renamed = adapters
    assert main(generate_argv(world, world.vqa, tmp_path / "out.jsonl", "--adapter", str(renamed))) == 2
    line = one_error_line(capsys.readouterr().err, "generate")
    assert "does not fit the model" in line and "lang_model" in line
    argv = ["merge-lora", "--base", str(world.llava), "--adapter", str(renamed), "--out", str(tmp_path / "merged")]
    assert main(argv) == 2
    assert "lang_model" in one_error_line(capsys.readouterr().err, "merge-lora")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "out.jsonl").exists()


def test_a_fitting_adapter_changes_the_answers(world, adapters, tmp_path):
    good, _ = adapters
    assert main(generate_argv(world, world.vqa, tmp_path / "base.jsonl", "--yes-no-scores")) == 0
    assert (
        main(generate_argv(world, world.vqa, tmp_path / "lora.jsonl", "--yes-no-scores", "--adapter", str(good))) == 0
    )

    def scores(path):
        return [json.loads(line)["yes_probability"] for line in path.read_text().splitlines()]

    assert all(a != b for a, b in zip(scores(tmp_path / "base.jsonl"), scores(tmp_path / "lora.jsonl"), strict=True))


# -- 3. a resume refuses what changed --------------------------------------------------------------------------


def interrupted(monkeypatch, argv: list[str], after_batches: int = 2) -> None:
    """Run ``argv`` and stop it (as a kill would) when it is about to write batch ``after_batches + 1``."""
    from mmed_rag.resumable import ResumableOutput

    append, calls = ResumableOutput.append, []

    def stop(self, lines):
        calls.append(1)
        if len(calls) > after_batches:
            raise KeyboardInterrupt
        append(self, lines)

    with monkeypatch.context() as patch:
        patch.setattr(ResumableOutput, "append", stop)
        with pytest.raises(KeyboardInterrupt):
            main(argv)


def test_retrieve_refuses_to_resume_with_another_k_or_index_and_fresh_starts_over(world, tmp_path, monkeypatch, capsys):
    source = tmp_path / "questions.jsonl"
    source.write_text("\n".join(many_questions(world, tmp_path)) + "\n")
    output = tmp_path / "out.jsonl"
    interrupted(monkeypatch, retrieve_argv(world, source, output, "--fixed_k", "3", "--batch_size", "4"))
    assert len(Path(f"{output}.partial").read_text().splitlines()) == 8
    other_index = tmp_path / "index-copy"
    other_index.mkdir()
    for path in world.index.iterdir():
        (other_index / path.name).write_bytes(path.read_bytes())
    (other_index / "config.yaml").write_text("changed: true\n")  # another index directory, another fingerprint
    argv = retrieve_argv(world, source, output, "--fixed_k", "5", "--batch_size", "4")
    argv[argv.index("--index") + 1] = str(other_index)
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err, "retrieve")
    assert "other inputs or settings" in line and "fixed_k: 3 then, 5 now" in line and "index:" in line
    assert "--fresh" in line and not output.exists()
    assert main([*argv, "--fresh"]) == 0
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(written) == 20 and {row["retrieve_k"] for row in written} == {5}


def test_generate_refuses_to_resume_without_retrieval_or_on_an_edited_input(world, tmp_path, monkeypatch, capsys):
    source = tmp_path / "questions.jsonl"
    source.write_text("\n".join(many_questions(world, tmp_path)) + "\n")
    output = tmp_path / "out.jsonl"
    with_reports = [
        *("generate", "--model", str(world.llava), "--registry", str(world.registry), "--modality", "radiology"),
        *("--input", str(source), "--output", str(output), "--img-root", str(world.images)),
        *("--max-new-tokens", "2", "--batch-size", "4", "--fixed-k", "2", "--device", "cpu"),
    ]
    interrupted(monkeypatch, with_reports)
    assert main(generate_argv(world, source, output, "--batch-size", "4", "--fixed-k", "2")) == 2
    line = one_error_line(capsys.readouterr().err, "generate")
    assert "no_retrieval: False then, True now" in line
    edited = [json.loads(line) for line in source.read_text().splitlines()]
    edited[0]["question"] = "Is there a pneumothorax?"  # same ids, another question
    source.write_text("".join(json.dumps(row) + "\n" for row in edited))
    assert main(with_reports) == 2
    assert "input sha256" in one_error_line(capsys.readouterr().err, "generate")
    assert len(Path(f"{output}.partial").read_text().splitlines()) == 8  # kept, untouched, for the right rerun


# -- 4. make-pairs checks that each run is the mode its flag claims ----------------------------------------------


@pytest.fixture(scope="module")
def retrieval_run(world, tmp_path_factory) -> Path:
    """One `generate` run with retrieval (its config saved beside it, as generate does)."""
    root = tmp_path_factory.mktemp("runs")
    argv = [
        *("generate", "--model", str(world.llava), "--registry", str(world.registry), "--modality", "radiology"),
        *("--input", str(world.vqa), "--output", str(root / "rag.jsonl"), "--img-root", str(world.images)),
        *("--max-new-tokens", "2", "--fixed-k", "2", "--device", "cpu"),
    ]
    assert main(argv) == 0 and (root / "rag.config.yaml").is_file()
    return root / "rag.jsonl"


def copy_run(run: Path, name: str, tmp: Path, **config_changes) -> Path:
    """A copy of a run under another name, with its saved config (optionally edited)."""
    import yaml

    copy = tmp / f"{name}.jsonl"
    copy.write_text(run.read_text())
    config = yaml.safe_load(run.with_name(f"{run.stem}.config.yaml").read_text()) | config_changes
    (tmp / f"{name}.config.yaml").write_text(yaml.safe_dump(config))
    return copy


def pairs_argv(tmp: Path, with_retrieval: Path, without: Path, noised: Path) -> list[str]:
    return [
        *("make-pairs", "--with-retrieval", str(with_retrieval), "--without-retrieval", str(without)),
        *("--noised", str(noised), "--out", str(tmp / "pairs")),
    ]


def test_make_pairs_refuses_one_run_in_two_roles(retrieval_run, tmp_path, capsys):
    assert main(pairs_argv(tmp_path, retrieval_run, retrieval_run, retrieval_run)) == 2
    line = one_error_line(capsys.readouterr().err, "make-pairs")
    assert "rag.jsonl is given as both --with-retrieval and --without-retrieval" in line
    assert not (tmp_path / "pairs").exists()


def test_make_pairs_refuses_copies_of_a_retrieval_run_named_by_their_real_mode(retrieval_run, tmp_path, capsys):
    without, noised = copy_run(retrieval_run, "plain", tmp_path), copy_run(retrieval_run, "noise", tmp_path)
    assert main(pairs_argv(tmp_path, retrieval_run, without, noised)) == 2
    line = one_error_line(capsys.readouterr().err, "make-pairs")
    assert "plain.jsonl was generated with retrieval, on the real images" in line
    assert "--without-retrieval needs a run without retrieval (--no-retrieval)" in line
    without = copy_run(retrieval_run, "plain2", tmp_path, no_retrieval=True)
    assert main(pairs_argv(tmp_path, retrieval_run, without, noised)) == 2
    line = one_error_line(capsys.readouterr().err, "make-pairs")
    assert "noise.jsonl was generated with retrieval, on the real images" in line and "--noised-image" in line
    # Without a saved config the records tell: a run "without retrieval" that holds retrieved reports.
    bare = tmp_path / "bare" / "plain.jsonl"
    bare.parent.mkdir()
    bare.write_text(retrieval_run.read_text())
    noised = copy_run(retrieval_run, "noise2", tmp_path, noised_image=True)
    assert main(pairs_argv(tmp_path, retrieval_run, bare, noised)) == 2
    assert "plain.jsonl holds retrieved reports" in one_error_line(capsys.readouterr().err, "make-pairs")


def test_make_pairs_refuses_runs_of_different_questions(retrieval_run, world, tmp_path, capsys):
    without = copy_run(retrieval_run, "plain", tmp_path, no_retrieval=True, input=str(tmp_path / "other.jsonl"))
    noised = copy_run(retrieval_run, "noise", tmp_path, noised_image=True)
    assert main(pairs_argv(tmp_path, retrieval_run, without, noised)) == 2
    line = one_error_line(capsys.readouterr().err, "make-pairs")
    assert "different 'input'" in line and "other.jsonl" in line


# -- the weak cases: clear errors, before any model is loaded -----------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a retriever or a generator fails the test: these errors must come before that work."""
    from mmed_rag.generation.generator import Generator
    from mmed_rag.retrieval import batch

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was found")

    monkeypatch.setattr(batch, "load_retriever", loaded)
    monkeypatch.setattr(Generator, "load", classmethod(loaded))


@pytest.mark.parametrize("stage", ["retrieve", "generate"])
@pytest.mark.parametrize(
    "name, content, says",
    [
        ("empty.jsonl", b"\n\n", "the file is empty"),
        ("empty.json", b"  ", "the file is empty"),
        ("wide.jsonl", '{"question_id": 1}\n'.encode("utf-16"), "UTF-16"),
    ],
)
def test_empty_and_utf16_inputs_fail_clearly_before_any_model_loads(
    stage, name, content, says, world, tmp_path, capsys, no_model_loads
):
    source = tmp_path / name
    source.write_bytes(content)
    build = retrieve_argv if stage == "retrieve" else generate_argv
    assert main(build(world, source, tmp_path / "out.jsonl")) == 2
    line = one_error_line(capsys.readouterr().err, stage)
    assert name in line and says in line


@pytest.mark.parametrize(
    "options, says",
    [
        (["--clip_threshold", "1.0"], "--clip_threshold: the ratio threshold must be above 1"),
        (["--select_rule", "absolute", "--select_threshold", "1.5"], "must lie in [-1, 1], got 1.5"),
        (["--select_rule", "gap", "--select_threshold", "0"], "gamma must be positive"),
    ],
)
def test_thresholds_that_can_never_select_are_config_errors(options, says, world, tmp_path, capsys, no_model_loads):
    assert main(retrieve_argv(world, world.vqa, tmp_path / "out.jsonl", *options)) == 2
    assert says in one_error_line(capsys.readouterr().err, "retrieve")


def test_a_random_bytes_checkpoint_is_named(world, tmp_path, capsys):
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(np.random.default_rng(0).bytes(10_000))
    argv = retrieve_argv(world, world.vqa, tmp_path / "out.jsonl", "--checkpoint_path", str(checkpoint))
    argv[argv.index("--model_name_or_path") + 1] = "tiny-clip"
    argv[argv.index("--index") : argv.index("--index") + 2] = ["--train_json", str(world.corpus)]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err, "retrieve")
    assert "weights.pt is not a PyTorch checkpoint" in line


def test_an_unwritable_output_folder_is_found_before_encoding(world, tmp_path, capsys, monkeypatch):
    from mmed_rag.retrieval import index

    def encoded(*args, **kwargs):
        raise AssertionError("the corpus was encoded before the output was checked")

    monkeypatch.setattr(index, "encode_texts", encoded)
    (tmp_path / "file").write_text("a file, not a folder")
    argv = ["build-index", "--retriever", str(world.clip), "--corpus", str(world.corpus), "--modality", "radiology"]
    assert main([*argv, "--out", str(tmp_path / "file/index")]) == 2
    assert "cannot create the folder of the output" in one_error_line(capsys.readouterr().err, "build-index")


def test_a_finished_output_is_not_silently_written_again(world, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    assert main(generate_argv(world, world.vqa, output)) == 0
    first = output.read_bytes()
    assert main(generate_argv(world, world.vqa, output)) == 2
    assert "exists and is complete" in one_error_line(capsys.readouterr().err, "generate")
    assert output.read_bytes() == first
    assert main(generate_argv(world, world.vqa, output, "--overwrite")) == 0
