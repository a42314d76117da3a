"""The authors' pair recipe, their yes/no rule and their report judge, checked against the rules as the issue
writes them down from their deleted scripts (read at commit f2023ea of richard-peng-xia/MMed-RAG): each expected
value below is derived here from those rules, not from the code under test."""

import json
import random
from collections import Counter

import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from mmed_rag.alignment.make_pairs import MakePairsConfig, make_pairs
from mmed_rag.alignment.pairs import FourRunItem, FourRunVerdicts, Judged, build_authors_stages
from mmed_rag.cli import main
from mmed_rag.config import ConfigError
from mmed_rag.data.records import read_preference
from mmed_rag.eval.correctness import ReportJudge
from mmed_rag.eval.yesno import parse_yes_no

WITHOUT = "<image>\nIs the heart enlarged? Please answer the question based on the image and choose from [yes, no]."
WITH = "<image>\nYou are provided with an X-ray image and 1 reference report(s): 1. Heart enlarged. \nQuestion: ..."


def their_yes_no(text: str) -> str:
    """The rule as the issue states it: "no"/"No"/"not" among the words before the first "." means no, else yes."""
    head = text.split(".")[0] if "." in text else text
    return "no" if any(word in ("no", "No", "not") for word in head.replace(",", "").split()) else "yes"


# -- their yes/no rule ---------------------------------------------------------------------------------------------

QUIRKS = [
    ("Yes.", "yes"),
    ("No, there is no effusion.", "no"),
    ("There is no effusion.", "no"),  # a negated finding reads as no
    ("The heart is not enlarged", "no"),
    ("NO", "yes"),  # case matters: only "No", "no" and "not"
    ("Not seen.", "yes"),
    ("", "yes"),  # nothing is unparseable
    ("I cannot tell.", "yes"),
    ("Yes, since there are no abnormalities.", "no"),  # a "no" in the justification wins
    ("Yes. No abnormality is seen.", "yes"),  # only the first sentence counts
]


@pytest.mark.parametrize(("answer", "label"), QUIRKS)
def test_their_yes_no_rule(answer, label):
    assert their_yes_no(answer) == label
    assert parse_yes_no(answer, "authors") == label


# Where the two rules disagree on the released VQA test answers (counted in the README).
DISAGREEMENTS = {
    "iuxray_test.jsonl": {(None, "no"): 22, (None, "yes"): 9, ("no", "yes"): 12, ("yes", "no"): 10},
    "pmc-oa_test.jsonl": {},
}


@pytest.mark.parametrize("filename", sorted(DISAGREEMENTS))
def test_their_rule_on_every_released_vqa_answer(release_dir, filename):
    lines = (release_dir / "test" / "vqa" / filename).read_text(encoding="utf-8").splitlines()
    answers = [json.loads(line)["answer"] for line in lines if line.strip()]
    assert answers
    assert all(parse_yes_no(answer, "authors") == their_yes_no(answer) for answer in answers)
    differ = Counter(
        (parse_yes_no(answer), parse_yes_no(answer, "authors"))
        for answer in answers
        if parse_yes_no(answer) != parse_yes_no(answer, "authors")
    )
    assert differ == DISAGREEMENTS[filename]


# -- their report judge --------------------------------------------------------------------------------------------


def their_score(answer: str, gold: str) -> float:
    """nltk sentence BLEU, smoothing method 7, on the text before the first "." with commas removed."""

    def head(text):
        return (text.split(".")[0] if "." in text else text).replace(",", "")

    return sentence_bleu([head(gold).split()], head(answer).split(), smoothing_function=SmoothingFunction().method7)


def test_their_report_judge_is_at_least_the_mean_of_the_runs_compared():
    golds = ["The heart is normal in size, the lungs are clear. No effusion.", "Large right pleural effusion."]
    runs = {
        "a": (["The heart is normal in size. Lungs clear.", "Small effusion."], golds),
        "b": (["The lungs are clear.", "Large right pleural effusion. More."], golds),
    }
    scores = {run: [their_score(p, g) for p, g in zip(*pair, strict=True)] for run, pair in runs.items()}
    mean = sum(scores["a"] + scores["b"]) / 4
    expected = {run: [score >= mean for score in values] for run, values in scores.items()}
    assert ReportJudge("authors").judge_runs(runs) == expected
    # A tie at the mean is right: when every report scores the same, every report is good (ours: none is).
    same = {"a": (["x y z."], ["The heart."]), "b": (["x y z."], ["The heart."])}
    assert ReportJudge("authors").judge_runs(same) == {"a": [True], "b": [True]}
    assert ReportJudge("BLEU-4").judge_runs(same) == {"a": [False], "b": [False]}


# -- the pairs, one case per branch ----------------------------------------------------------------------------------


def four(key, without="Yes", without_noised="Yes", with_reports="Yes", with_noised="Yes", image_id="", gold="Yes"):
    return FourRunItem(
        key, f"img{key}.png", gold, WITHOUT, WITH, without, without_noised, with_reports, with_noised, image_id
    )


def judged_vqa(item: FourRunItem) -> FourRunVerdicts:
    """Each answer right when its yes/no (their rule) equals the gold's, compared as the issue lists."""

    def right(answer):
        return their_yes_no(answer) == their_yes_no(item.gold)

    return FourRunVerdicts(
        Judged(right(item.without_retrieval), right(item.without_retrieval_noised)),
        Judged(right(item.with_retrieval), right(item.with_retrieval_noised)),
        Judged(right(item.without_retrieval), right(item.with_retrieval)),
    )


def test_each_branch_of_their_vqa_recipe():
    items = [
        four(1, without="Yes, it is.", without_noised="No."),  # 1: right on the image, wrong on noise
        four(2, with_reports="Yes.", with_noised="Yes, enlarged."),  # 2a: right with reports on both images
        four(3, without="Yes!", with_reports="No.", with_noised="No", image_id="p3"),  # 2b: misled by the reports
        four(4, without="No.", without_noised="No", with_noised="No", image_id="p4"),  # 2c: helped by them
        four(5, without="No", without_noised="No", with_reports="No", with_noised="No"),  # wrong everywhere
        four(6, with_reports="Yes, big.", with_noised="Yes"),  # 2a
        four(7, gold="No", without="No", without_noised="No", with_reports="No.", with_noised="Yes"),  # none
    ]
    stages = build_authors_stages(items, [judged_vqa(item) for item in items], "vqa")
    stage1 = [pair.record for pair in stages.stage1]
    # Stage 1 (item 1): the model's own answers, the prompt without reports, rejected with the noise image.
    assert [(r.id, r.chosen, r.rejected, r.prompt, r.rejected_noised) for r in stage1] == [
        (1, "Yes, it is.", "No.", WITHOUT, 1)
    ]
    # Every item right with reports on both images is a 2a pair: 1, 2, 6 (1 is right everywhere but on noise
    # without reports). The sample: int(0.5 x (|2b| + |2c|)) = 1 of them, drawn as random.seed(42) would.
    found = [1, 2, 6]
    kept = random.Random(42).sample(found, 1)
    assert stages.found_2a == 3 and stages.shortfall == 0
    stage2 = [pair.record for pair in stages.stage2]
    assert [r.id for r in stage2] == [*kept, "p3", "p4"]  # the 2a sample, then 2b, then 2c; 2b/2c by image_id
    misled, helped = stage2[1], stage2[2]
    assert (misled.chosen, misled.rejected, misled.prompt, misled.rejected_noised) == ("Yes!", "No.", WITH, 0)
    assert (helped.chosen, helped.rejected, helped.prompt) == ("Yes", "No.", WITH)
    assert stage2[0].prompt == WITH and stage2[0].rejected_noised == 1
    # Too few 2a pairs for the sample: all kept, the shortfall said (their script raised ValueError).
    short = build_authors_stages(items[2:4], [judged_vqa(item) for item in items[2:4]], "vqa", ratio=2.0)
    assert short.found_2a == 0 and short.shortfall == 4 and [r.record.id for r in short.stage2] == ["p3", "p4"]


def test_reports_choose_the_gold_report():
    gold = "The heart is enlarged. No effusion."
    item = four(1, without="The heart is enlarged.", without_noised="Lungs clear.", gold=gold, image_id="i1")
    verdicts = FourRunVerdicts(Judged(True, False), Judged(True, True), Judged(False, True))
    stages = build_authors_stages([item], [verdicts], "report", ratio=2.0)
    assert [(p.kind, p.record.chosen, p.record.rejected) for p in [*stages.stage1, *stages.stage2]] == [
        ("1", gold, "Lungs clear."),
        ("2a", gold, "Yes"),
        ("2c", gold, "The heart is enlarged."),
    ]


# -- make-pairs --recipe authors, end to end -----------------------------------------------------------------------


def write_run(path, answers, gold, prompt, reports):
    rows = [
        {
            "question_id": key,
            "image_id": f"p{key}",
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
    return str(path)


@pytest.fixture
def four_runs(tmp_path):
    gold = {1: "Yes", 2: "No", 3: "Yes", 4: "No"}
    answers = {
        "without_retrieval": {1: "Yes", 2: "No", 3: "Yes", 4: "Yes"},
        "without_retrieval_noised": {1: "No", 2: "No", 3: "Yes", 4: "Yes"},
        "with_retrieval": {1: "Yes", 2: "No", 3: "No", 4: "No"},
        "noised": {1: "Yes", 2: "No", 3: "No", 4: "Yes"},
    }
    reports = ("The heart is enlarged.",)
    return {
        run: write_run(
            tmp_path / f"{run}.jsonl",
            values,
            gold,
            WITHOUT if run.startswith("without") else WITH,
            () if run.startswith("without") else reports,
        )
        for run, values in answers.items()
    }


def test_make_pairs_authors_recipe_from_four_runs(four_runs, tmp_path, capsys):
    argv = ["make-pairs", "--recipe", "authors", "--out", str(tmp_path / "pairs")]
    argv += [arg for run, path in four_runs.items() for arg in (f"--{run.replace('_', '-')}", path)]
    assert main(argv) == 0
    # 1: stage 1. 1 and 2: 2a (right with reports on both images). 3: 2b (misled). 4: 2c (helped).
    # 2a sample: int(0.5 x 2) = 1 of [1, 2], drawn with seed 42.
    stage1 = read_preference(tmp_path / "pairs/stage1.json").records
    assert [(r.id, r.prompt, r.chosen, r.rejected) for r in stage1] == [(1, WITHOUT, "Yes", "No")]
    stage2 = json.loads((tmp_path / "pairs/stage2.json").read_text())
    assert [p["id"] for p in stage2] == [random.Random(42).sample([1, 2], 1)[0], "p3", "p4"]
    summary = json.loads((tmp_path / "pairs/summary.json").read_text())
    assert summary["recipe"] == "authors" and summary["found_2a"] == 2 and summary["yes_no_rule"] == "authors"
    out = capsys.readouterr().out
    assert "| 1 | 2a | 2b | 2c |" in out and "| radiology | 1 | 1 | 1 | 1 |" in out
    assert "2a 1 (sampled of 2 found), 2b, 2c" in out


def test_the_authors_recipe_needs_its_fourth_run(four_runs, tmp_path):
    runs = {run: path for run, path in four_runs.items() if run != "without_retrieval_noised"}
    with pytest.raises(ConfigError, match="needs 4 generate outputs; missing --without-retrieval-noised"):
        make_pairs(MakePairsConfig(**runs, recipe="authors", out=str(tmp_path / "p")))
    with pytest.raises(ConfigError, match="add --recipe authors"):
        MakePairsConfig(**four_runs, out=str(tmp_path / "p"))


def test_both_recipes_write_pairs_our_dpo_stages_train_on(four_runs, tmp_path):
    from PIL import Image

    from mmed_rag.testing import save_tiny_llava

    images = tmp_path / "images/radiology"
    images.mkdir(parents=True)
    for key in range(1, 5):
        Image.new("RGB", (32, 32), (40 * key, 60, 90)).save(images / f"img{key}.png")
    model = save_tiny_llava(tmp_path / "llava")
    paper = {run: path for run, path in four_runs.items() if run != "without_retrieval_noised"}
    recipes = {
        "paper": ["--recipe", "paper", *(a for run, p in paper.items() for a in (f"--{run.replace('_', '-')}", p))],
        "authors": ["--recipe", "authors", *(a for r, p in four_runs.items() for a in (f"--{r.replace('_', '-')}", p))],
    }
    for recipe, options in recipes.items():
        pairs = tmp_path / f"pairs-{recipe}"
        assert main(["make-pairs", "--out", str(pairs), *options]) == 0
        out = tmp_path / f"dpo-{recipe}"
        argv = ["train-dpo", "--model_name_or_path", str(model), "--image_folder", str(tmp_path / "images")]
        argv += ["--data_path", str(pairs / "stage1.json"), "--stage2_data_path", str(pairs / "stage2.json")]
        argv += ["--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "1"]
        argv += ["--bf16", "False", "--gradient_checkpointing", "False", "--report_to", "none"]
        argv += ["--lora_r", "4", "--lora_alpha", "8", "--save_strategy", "no"]
        assert main(argv) == 0, recipe
        for stage in ("stage1", "stage2"):
            assert (out / stage / "adapter_model.safetensors").is_file(), (recipe, stage)


def test_make_pairs_authors_recipe_for_reports_judges_each_comparison_against_its_own_mean(tmp_path):
    golds = {
        1: "The heart is enlarged, with a small effusion. Lungs clear.",
        2: "No acute cardiopulmonary process. Normal heart.",
        3: "Right lower lobe consolidation. No effusion.",
        4: "Mild cardiomegaly without edema. Stable.",
    }
    answers = {
        "without_retrieval": {1: golds[1], 2: "Normal heart.", 3: "Right lower lobe consolidation.", 4: "x."},
        "without_retrieval_noised": {1: "Lungs clear.", 2: "No acute process.", 3: golds[3], 4: "Stable."},
        # No answer with reports shares a word with its gold report: all eight score exactly 0, the mean is 0, and
        # every one ties at it. Their judge counts a tie as right, so all four are 2a pairs (strictly above: none).
        "with_retrieval": dict.fromkeys(golds, "zzz qqq."),
        "noised": dict.fromkeys(golds, "qqq."),
    }
    rows = {
        run: [
            {
                "id": key,
                "image": f"radiology/img{key}.png",
                "report": golds[key],
                "modality": "radiology",
                "prompt": WITHOUT if run.startswith("without") else WITH,
                "prediction": text,
                "reference_reports": [] if run.startswith("without") else ["Heart enlarged."],
            }
            for key, text in values.items()
        ]
        for run, values in answers.items()
    }
    paths = {}
    for run, records in rows.items():
        paths[run] = str(tmp_path / f"{run}.json")
        (tmp_path / f"{run}.json").write_text(json.dumps(records))

    def right(first, second):
        scores = {run: {k: their_score(answers[run][k], golds[k]) for k in golds} for run in (first, second)}
        mean = sum(s for values in scores.values() for s in values.values()) / (2 * len(golds))
        return {run: {k: score >= mean for k, score in values.items()} for run, values in scores.items()}

    stage1 = right("without_retrieval", "without_retrieval_noised")
    stage2a = right("with_retrieval", "noised")
    stage2bc = right("without_retrieval", "with_retrieval")
    expected1 = [k for k in golds if stage1["without_retrieval"][k] and not stage1["without_retrieval_noised"][k]]
    found_2a = [k for k in golds if stage2a["with_retrieval"][k] and stage2a["noised"][k]]
    expected_2b = [k for k in golds if stage2bc["without_retrieval"][k] and not stage2bc["with_retrieval"][k]]
    expected_2c = [k for k in golds if stage2bc["with_retrieval"][k] and not stage2bc["without_retrieval"][k]]
    assert found_2a == [1, 2, 3, 4] and expected1 and expected_2b  # the tie at work; real stage 1 and 2b pairs

    result = make_pairs(MakePairsConfig(**paths, recipe="authors", task="report", out=str(tmp_path / "pairs")))
    stage1_records = read_preference(result.stage1).records
    assert [r.id for r in stage1_records] == expected1
    assert all(r.chosen == golds[r.id] for r in stage1_records)  # reports: the gold report is chosen
    assert [r.rejected for r in stage1_records] == [answers["without_retrieval_noised"][k] for k in expected1]
    kept = random.Random(42).sample(found_2a, int(0.5 * (len(expected_2b) + len(expected_2c))))
    stage2_ids = [r.id for r in read_preference(result.stage2).records]
    # 2b and 2c records have no image_id: their id is "" as in the released files.
    assert stage2_ids == [*kept, *[""] * (len(expected_2b) + len(expected_2c))]
    assert result.summary["judge_metric"] == "authors" and result.summary["found_2a"] == 4
