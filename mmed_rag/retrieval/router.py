"""Modality → retriever + report index, from a YAML registry: new modalities are added by config, not code.

A registry names, per modality, the retriever directory (``save_clip`` / ``finetune-clip`` output) and the index
directory (``build-index`` output)::

    modalities:
      radiology:     {retriever: runs/radiology/best, index: indexes/radiology}
      pathology:     {retriever: runs/pathology/best, index: indexes/pathology}

Relative paths are relative to the registry file. Every entry is validated when the router is created (the
index's manifest must pin exactly that retriever and modality: a cheap check that reads no model and no FAISS
file), so a wrong registry fails at start-up, not at example 9,000; each retriever and index is then loaded on
first use and kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mmed_rag.errors import MMedRAGError
from mmed_rag.retrieval.index import ReportIndex, Retriever, RetrieverIdentity

logger = logging.getLogger(__name__)


class RegistryError(MMedRAGError, ValueError):
    """A registry file that cannot be read, or an entry that does not fit its index."""


class UnknownModalityError(MMedRAGError, KeyError):
    """A modality with no registered retriever and index."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ModalityEntry:
    retriever: Path
    index: Path


def read_registry(path: str | Path) -> dict[str, ModalityEntry]:
    """Read a registry YAML; paths are resolved against the file's folder."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise RegistryError(f"cannot read the modality registry {path}: {error}") from None
    modalities = document.get("modalities") if isinstance(document, dict) else None
    if not isinstance(modalities, dict) or not modalities:
        raise RegistryError(f"{path}: expected a 'modalities' mapping of modality -> {{retriever, index}}")
    entries = {}
    for modality, entry in modalities.items():
        if not isinstance(entry, dict) or set(entry) != {"retriever", "index"}:
            raise RegistryError(f"{path}: modality '{modality}' needs exactly 'retriever' and 'index', got {entry!r}")
        entries[str(modality)] = ModalityEntry(*(path.parent / str(entry[key]) for key in ("retriever", "index")))
    return entries


class Router:
    """The retriever and index of each registered modality, validated up front, loaded lazily once."""

    def __init__(self, entries: dict[str, ModalityEntry], device: str | torch.device = "cpu"):
        self.entries = dict(entries)
        self.device = device
        self._loaded: dict[str, tuple[Retriever, ReportIndex]] = {}
        for modality, entry in self.entries.items():
            try:
                ReportIndex.validate(entry.index, RetrieverIdentity.of_saved(entry.retriever), modality=modality)
            except (OSError, ValueError) as error:
                raise RegistryError(f"modality '{modality}': {error}") from error

    @classmethod
    def from_registry(cls, path: str | Path, device: str | torch.device = "cpu") -> Router:
        return cls(read_registry(path), device)

    @property
    def modalities(self) -> list[str]:
        return list(self.entries)

    def get(self, modality: str) -> tuple[Retriever, ReportIndex]:
        """The modality's retriever and index (loaded on the first call)."""
        if modality not in self.entries:
            known = ", ".join(self.entries) or "none"
            raise UnknownModalityError(f"no retriever and index registered for modality '{modality}' (known: {known})")
        if modality not in self._loaded:
            entry = self.entries[modality]
            retriever = Retriever.load(entry.retriever, device=self.device)
            self._loaded[modality] = (retriever, ReportIndex.load(entry.index, retriever.identity, modality=modality))
            logger.info("Loaded the %s retriever %s and index %s", modality, entry.retriever, entry.index)
        return self._loaded[modality]
