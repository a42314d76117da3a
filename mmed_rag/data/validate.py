"""``mmed-rag validate-data``: check data files (and their images) before a long job finds the problem."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from mmed_rag.config import ConfigError
from mmed_rag.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, ImagePathError, load_image
from mmed_rag.data.records import DEFAULT_MAX_RECORD_BYTES, KINDS, ReadResult, RecordError, read_records
from mmed_rag.progress import progress_bar

logger = logging.getLogger(__name__)


@dataclass
class ValidateConfig:
    """Arguments of ``validate-data``."""

    files: list[str] = field(default_factory=list, metadata={"positional": True, "help": "data files to check"})
    image_root: str | None = field(
        default=None, metadata={"help": "also check that every referenced image is inside this root and opens"}
    )
    kind: str | None = field(default=None, metadata={"help": f"record kind ({', '.join(KINDS)}); detected if unset"})
    max_record_bytes: int = field(default=DEFAULT_MAX_RECORD_BYTES, metadata={"help": "largest record accepted"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "largest image accepted (pixels)"})

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise ConfigError(f"kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")


@dataclass
class FileReport:
    path: Path
    result: ReadResult | None = None
    error: RecordError | None = None  # the file could not be read at all
    images_checked: int = 0
    image_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.result is not None and self.result.ok and not self.image_problems


@dataclass
class ValidationReport:
    files: list[FileReport]

    @property
    def ok(self) -> bool:
        return all(report.ok for report in self.files)

    def render(self) -> str:
        lines = []
        for report in self.files:
            if report.error is not None:
                lines.append(f"{report.path}: unreadable\n  error: {report.error}")
                continue
            lines.append(report.result.summary())
            if report.images_checked:
                lines.append(f"  images: {report.images_checked} checked, {len(report.image_problems)} problem(s)")
            lines += [f"  image error: {problem}" for problem in report.image_problems]
        records = sum(len(r.result) for r in self.files if r.result is not None)
        errors = sum(len(r.result.errors) for r in self.files if r.result is not None)
        errors += sum(r.error is not None for r in self.files)
        warnings = sum(len(r.result.warnings) for r in self.files if r.result is not None)
        images = sum(len(r.image_problems) for r in self.files)
        lines.append(
            f"{'OK' if self.ok else 'FAILED'}: {len(self.files)} file(s), {records} record(s), {errors} error(s), "
            f"{warnings} warning(s), {images} image problem(s)"
        )
        return "\n".join(lines)


def _check_images(report: FileReport, image_root: str, max_pixels: int) -> None:
    checked: set[str] = set()
    pairs = [
        (position, image)
        for position, record in zip(report.result.positions, report.result.records, strict=True)
        for image in record.image_paths
    ]
    for position, image in progress_bar(pairs, desc=f"images of {report.path.name}", unit="img", leave=False):
        if image in checked:
            continue
        checked.add(image)
        try:
            load_image(image_root, image, max_pixels=max_pixels)
        except (ImagePathError, ImageLoadError) as error:
            report.image_problems.append(f"{report.path}, {position}: {error}")
    report.images_checked = len(checked)


def validate_data(
    files: list[str],
    image_root: str | None = None,
    kind: str | None = None,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ValidationReport:
    """Read every file with ``on_error="skip"`` so all problems are listed, not just the first one."""
    reports = []
    for name in files:
        report = FileReport(Path(name))
        try:
            report.result = read_records(name, kind, on_error="skip", max_record_bytes=max_record_bytes)
        except RecordError as error:
            report.error = error
        if report.result is not None and image_root is not None:
            _check_images(report, image_root, max_pixels)
        reports.append(report)
    return ValidationReport(reports)
