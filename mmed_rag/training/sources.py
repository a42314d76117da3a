"""Where a stage's rows come from: conversation files under the run's image folder, or DAMON's data configs.

A stage names its data either as conversation files (``data``, weighted by ``mix``, images under ``image_folder``)
or as a DAMON data config (``damon_data``: ``model/shell/data/*.json``, unchanged), or both. A config's datasets
each bring their own image folder (``root``) and weight (``repeat_time``), which is how InternVL's trainer reads
them, so one run may mix MIMIC-CXR pairs with another data set's images. An entry's ``data_augment`` and
``max_dynamic_patch`` (InternVL's augmentation and image tiling) are not applied: the trained model's processor
prepares its images. Both kinds become a :class:`DataSource`, read alike by the SFT trainer; an error about a
config's record names the config and the dataset as well as the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmed_rag.damon.data import DamonDataEntry, read_damon_annotations, read_damon_data_config
from mmed_rag.data.records import ReadResult, read_conversations
from mmed_rag.errors import MMedRAGError


class DataSourceError(MMedRAGError, ValueError):
    """A stage's data file that is not there."""


@dataclass(frozen=True)
class DataSource:
    """One conversation file of a stage, its image folder and its share of records per epoch."""

    path: str
    image_folder: str
    weight: float = 1.0
    dataset: DamonDataEntry | None = None  # the DAMON data-config entry it comes from
    config: str = ""  # that entry's config file

    @property
    def origin(self) -> str:
        """Where the file was named, for errors: "" for a data file, "dataset 'x' of config.json" for an entry."""
        return f"dataset {self.dataset.name!r} of {self.config}" if self.dataset else ""

    def read(self, on_error: str) -> ReadResult:
        """Its conversations; a DAMON entry's also checked for at most four images, one role each."""
        if self.dataset is not None:
            return read_damon_annotations(self.dataset, on_error=on_error)
        return read_conversations(self.path, on_error=on_error)


def data_sources(
    files: tuple[str, ...], mix: tuple[float, ...], damon_config: str, image_folder: str, stage: str
) -> list[DataSource]:
    """The sources of ``files`` (weighted by ``mix``, images under ``image_folder``) and of ``damon_config``'s
    datasets; a file that is not there is an error naming the stage (and the config's dataset)."""
    for path in files:
        if not Path(path).is_file():
            raise DataSourceError(f"{path}: data file of stage {stage} not found")
    weights = mix or (1.0,) * len(files)
    sources = [DataSource(path, image_folder, weight) for path, weight in zip(files, weights, strict=True)]
    if damon_config:
        if not Path(damon_config).is_file():
            raise DataSourceError(f"{damon_config}: DAMON data config of stage {stage} not found")
        sources += [
            DataSource(entry.annotation, entry.root, entry.repeat_time, entry, damon_config)
            for entry in read_damon_data_config(damon_config)  # an entry without its annotation is an error there
        ]
    return sources
