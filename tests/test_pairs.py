"""RAG-PT pair construction: hand-made answers in, the released format and the right pair types out."""

import json
from collections import Counter

import pytest

from mmed_rag.alignment.make_pairs import MakePairsConfig, make_pairs
from mmed_rag.alignment.pairs import (
    CROSS_MODALITY,
    OVERALL_ALIGNMENT,
    RETRIEVAL_HELPS,
    RETRIEVAL_MISLEADS,
    AnsweredItem,
    Verdicts,
    build_pairs,
    pair_of,
    released_type,
    split_stages,
)
from mmed_rag.cli import main
from mmed_rag.data.records import read_preference
from mmed_rag.eval.examples import EvalInputError

PROMPT = (
    "<image>\nYou are provided with an X-ray image and 1 reference report(s): 1. Heart enlarged. "
    "Question: Is the heart enlarged?"
)


def item(key, with_retrieval="Yes", without_retrieval="Yes", noised="No", gold="Yes", modality="radiology"):
    return AnsweredItem(key, f"img{key}.png", gold, PROMPT, with_retrieval, without_retrieval, noised, modality)


def test_copying_under_noise_gives_a_cross_modality_pair():
    (pair,) = pair_of(item(1, noised="Yes, it is."), Verdicts(True, True, True))
    assert pair.kind == CROSS_MODALITY and pair.record.rejected_noised == 1
    assert pair.record.prompt == PROMPT and pair.record.rejected_conversations[0].value == PROMPT
    assert (pair.record.chosen, pair.record.rejected) == ("Yes", "Yes, it is.")  # same verdict, other image


def test_retrieval_helps_rejects_the_answer_without_reports():
    (pair,) = pair_of(item(1, without_retrieval="No."), Verdicts(True, False, False))
    assert pair.kind == RETRIEVAL_HELPS and pair.record.rejected_noised == 0
    assert (pair.record.chosen, pair.record.rejected) == ("Yes", "No.")


def test_retrieval_misleads_rejects_the_misled_answer():
    (pair,) = pair_of(item(1, with_retrieval="No, it is normal."), Verdicts(False, True, False))
    assert pair.kind == RETRIEVAL_MISLEADS and pair.record.rejected == "No, it is normal."
    assert pair.record.prompt == PROMPT  # the prompt with the reports on both sides


def test_an_item_can_give_two_pairs_or_none():
    kinds = [p.kind for p in pair_of(item(1), Verdicts(True, False, True))]
    assert kinds == [CROSS_MODALITY, RETRIEVAL_HELPS]
    assert pair_of(item(1), Verdicts(True, True, False)) == []  # right everywhere, needs the image: no pair
    assert pair_of(item(1), Verdicts(False, False, False)) == []  # wrong everywhere: nothing to prefer


def test_stage_two_mixes_alignment_pairs_with_half_the_cross_modality_pairs():
    items = [item(k) for k in range(10)]
    verdicts = [Verdicts(True, False, True)] * 6 + [Verdicts(False, True, False)] * 4
    pairs = build_pairs(items, verdicts)
    stages = split_stages(pairs, cross_ratio=0.5, seed=3)
    assert len(stages.stage1) == 6 and all(p.kind == CROSS_MODALITY for p in stages.stage1)
    kinds = Counter(p.kind for p in stages.stage2)
    assert kinds == {RETRIEVAL_HELPS: 6, RETRIEVAL_MISLEADS: 4, CROSS_MODALITY: 3}
    assert split_stages(pairs, 0.5, seed=3) == stages  # seeded
    assert Counter(p.kind for p in split_stages(pairs, 1.0).stage2)[CROSS_MODALITY] == 6
    with pytest.raises(ValueError, match="cross_ratio"):
        split_stages(pairs, 1.5)


def write_run(path, answers, gold, prompt=PROMPT, reports=("The heart is enlarged.",)):
    """A generate output as make-pairs reads it (a run without retrieval has no reference reports)."""
    rows = [
        {
            "question_id": key,
            "question": "Is the heart enlarged?\n<image>",
            "answer": gold[key],
            "image": f"radiology/img{key}.png",
            "modality": "radiology",
            "prompt": prompt,
            "prediction": answer,
            "reference_reports": list(reports),
            "retrieve_k": len(reports),
        }
        for key, answer in answers.items()
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def runs(tmp_path):
    gold = {1: "Yes", 2: "No", 3: "Yes", 4: "No", 5: "Yes"}
    rag = {1: "Yes", 2: "No", 3: "No", 4: "No.", 5: "Yes"}
    plain = {1: "No", 2: "No", 3: "Yes", 4: "Yes", 5: "Yes"}
    noised = {1: "Yes", 2: "Yes", 3: "No", 4: "No", 5: "No"}
    return {
        "with_retrieval": write_run(tmp_path / "rag.jsonl", rag, gold),
        "without_retrieval": write_run(tmp_path / "plain.jsonl", plain, gold, reports=()),
        "noised": write_run(tmp_path / "noised.jsonl", noised, gold),
    }


def test_make_pairs_writes_the_released_format(runs, tmp_path, capsys):
    argv = ["make-pairs", "--out", str(tmp_path / "pairs")]
    argv += [arg for run, path in runs.items() for arg in (f"--{run.replace('_', '-')}", str(path))]
    assert main(argv) == 0
    # 1 and 4: helped by retrieval and right under noise (two pairs each); 3: misled; 2 and 5: no pair.
    stage1 = json.loads((tmp_path / "pairs/stage1.json").read_text())
    assert [(p["id"], p["rejected_noised"]) for p in stage1] == [(1, 1), (4, 1)]
    assert set(stage1[0]) == {"id", "image", "conversations", "rejected_conversations", "rejected_noised"}
    assert stage1[0]["conversations"] == [
        {"from": "human", "value": PROMPT},
        {"from": "gpt", "value": "Yes"},
    ]
    assert stage1[0]["image"] == "radiology/img1.png"
    stage2 = read_preference(tmp_path / "pairs/stage2.json").records
    assert Counter(released_type(r) for r in stage2) == {OVERALL_ALIGNMENT: 3, CROSS_MODALITY: 1}
    assert {(r.id, r.rejected) for r in stage2 if r.rejected_noised == 0} == {(1, "No"), (3, "No"), (4, "Yes")}
    summary = json.loads((tmp_path / "pairs/summary.json").read_text())
    assert summary["pairs"] == {
        "radiology/cross_modality": 2,
        "radiology/retrieval_helps": 2,
        "radiology/retrieval_misleads": 1,
    }
    assert summary["accuracy"]["with_retrieval"] == pytest.approx(4 / 5)
    assert "| radiology | 2 | 2 | 1 | 5 |" in capsys.readouterr().out


def test_runs_must_answer_the_same_items(runs, tmp_path):
    gold = {1: "Yes", 2: "No"}
    short = write_run(tmp_path / "short.jsonl", {1: "Yes", 2: "No"}, gold)
    config = MakePairsConfig(**{**{k: str(v) for k, v in runs.items()}, "noised": str(short)}, out=str(tmp_path / "p"))
    with pytest.raises(EvalInputError, match=r"rag.jsonl: 3 id\(s\) not answered in all 3 runs"):
        make_pairs(config)


def test_a_run_without_prompts_is_refused(runs, tmp_path):
    gold = {k: "Yes" for k in range(1, 6)}
    bare = write_run(tmp_path / "bare.jsonl", dict.fromkeys(gold, "Yes"), gold, prompt="")
    config = MakePairsConfig(**{**{k: str(v) for k, v in runs.items()}, "with_retrieval": str(bare)}, out=str(tmp_path))
    with pytest.raises(EvalInputError, match="field 'prompt': missing"):
        make_pairs(config)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("radiology/radiology_report.json", {CROSS_MODALITY: 233, OVERALL_ALIGNMENT: 468}),
        ("ophthalmology/harvard_vqa.json", {CROSS_MODALITY: 824, OVERALL_ALIGNMENT: 1030}),
    ],
)
def test_released_pair_files_read_back_with_their_type_counts(release_dir, name, expected):
    records = read_preference(release_dir / "training/alignment" / name).records
    assert Counter(released_type(record) for record in records) == expected
    assert all(record.prompt == record.rejected_conversations[0].value for record in records)
