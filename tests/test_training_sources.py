"""A stage's data from DAMON's data configs: each dataset's images under its own root, its repeat_time as its mix,
and errors that name the config and the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmed_rag.damon.data import DamonDataError
from mmed_rag.data.records import RecordError
from mmed_rag.training.sft import load_rows, stage_sources
from mmed_rag.training.sft_config import SFTStage
from mmed_rag.training.sources import DataSourceError


def dataset(folder: Path, name: str, records: int, images: int = 1) -> Path:
    """``records`` conversations about ``images`` films each (all written under ``folder/name``)."""
    root = folder / name
    root.mkdir(parents=True)
    rows = []
    for index in range(records):
        films = [f"{index}-{n}.png" for n in range(images)]
        for film in films:
            Image.new("L", (8, 8), color=index).save(root / film)
        human = "".join("<image>\n" for _ in films) + "What changed?"
        rows.append(
            {
                "id": index,
                "image": films if images > 1 else films[0],
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": f"answer {index}"}],
            }
        )
    annotation = folder / f"{name}.jsonl"
    annotation.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return annotation


def damon_config(folder: Path, entries: dict[str, dict]) -> Path:
    path = folder / "config.json"
    path.write_text(json.dumps(entries, indent=2))
    return path


@pytest.fixture
def two_datasets(tmp_path):
    """DAMON's layout: one config, two datasets with their own image roots, repeated 2 and 0.5 times."""
    dataset(tmp_path, "pairs", 4, images=2)
    dataset(tmp_path, "singles", 6)
    return damon_config(
        tmp_path,
        {
            "pairs": {"root": "pairs/", "annotation": "pairs.jsonl", "repeat_time": 2, "length": 4},
            "singles": {"root": "singles/", "annotation": "singles.jsonl", "repeat_time": 0.5, "data_augment": False},
        },
    )


def test_each_dataset_brings_its_root_and_its_repeat_time(two_datasets, tmp_path):
    stage = SFTStage(name="dsl", damon_data=str(two_datasets), val_data=(str(tmp_path / "singles.jsonl"),))
    train, val = stage_sources(stage, str(tmp_path / "singles"))
    assert [(Path(s.path).name, s.weight, s.origin) for s in train] == [
        ("pairs.jsonl", 2.0, f"dataset 'pairs' of {two_datasets}"),
        ("singles.jsonl", 0.5, f"dataset 'singles' of {two_datasets}"),
    ]
    rows, skipped = load_rows(train, "raise", seed=0)
    assert not skipped and len(rows) == 2 * 4 + 3  # every pair twice, half of the singles
    for row in rows:
        root = tmp_path / ("pairs" if len(row["images"]) == 2 else "singles")
        assert all(Path(image).parent == root and Path(image).is_file() for image in row["images"])
    # Val data given as files reads its images under the run's image folder.
    val_rows, _ = load_rows(val, "raise", seed=0)
    assert len(val_rows) == 6 and all(Path(row["images"][0]).parent == tmp_path / "singles" for row in val_rows)


def test_an_image_missing_under_its_root_names_the_config_the_dataset_and_the_record(two_datasets, tmp_path):
    (tmp_path / "singles" / "2-0.png").unlink()
    train, _ = stage_sources(SFTStage(name="dsl", damon_data=str(two_datasets)), "")
    with pytest.raises(RecordError) as error:
        load_rows(train, "raise", seed=0)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'singles.jsonl'}, line 3: field 'image': image not found:")
    assert f"dataset 'singles' of {two_datasets}" in message and str(tmp_path / "singles") in message
    rows, skipped = load_rows(train, "skip", seed=0)  # on_error: skip leaves it out and says so
    assert len(skipped) == 1 and "dataset 'singles'" in skipped[0] and len(rows) == 8 + 2


def test_a_config_whose_annotation_is_absent_names_the_dataset(tmp_path):
    config = damon_config(tmp_path, {"mimic_pairs": {"root": "images/", "annotation": "absent.jsonl"}})
    with pytest.raises(DamonDataError, match=r"config.json: dataset 'mimic_pairs': field 'annotation': .*absent"):
        stage_sources(SFTStage(name="dsl", damon_data=str(config)), "")
    with pytest.raises(DataSourceError, match=r"nope.json: DAMON data config of stage dsl not found"):
        stage_sources(SFTStage(name="dsl", damon_data=str(tmp_path / "nope.json")), "")


def test_a_record_with_five_images_is_refused_by_damons_reader(tmp_path):
    dataset(tmp_path, "five", 1, images=5)
    config = damon_config(tmp_path, {"five": {"root": "five/", "annotation": "five.jsonl"}})
    train, _ = stage_sources(SFTStage(name="dsl", damon_data=str(config)), "")
    with pytest.raises(DamonDataError, match=r"five.jsonl, line 1: field 'image': expected 1 to 4 images, got 5"):
        load_rows(train, "raise", seed=0)
