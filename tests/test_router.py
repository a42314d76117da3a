"""The modality router: a YAML registry, validated at start-up, loaded lazily."""

import pytest

from mmed_rag.data.phantoms import PhantomConfig, make_phantoms
from mmed_rag.retrieval.clip import save_clip
from mmed_rag.retrieval.index import ReportIndex
from mmed_rag.retrieval.router import RegistryError, Router, UnknownModalityError, read_registry
from mmed_rag.testing import tiny_clip


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("router")
    make_phantoms(PhantomConfig(out=str(root / "data"), n=60, size=64, modalities=("radiology", "pathology")))
    for seed, modality in enumerate(("radiology", "pathology")):
        save_clip(tiny_clip(seed)[0], root / f"clip-{modality}", "tiny-clip")
        corpus = root / f"data/training/retriever/{modality}/{modality}_train.json"
        ReportIndex.build(root / f"clip-{modality}", corpus, modality, progress=False).save(root / f"index-{modality}")
    return root


def write_registry(root, text):
    path = root / "registry.yaml"
    path.write_text(text)
    return path


def test_registry_routes_each_modality_to_its_own_retriever_and_index(artefacts):
    path = write_registry(
        artefacts,
        "modalities:\n"
        "  radiology: {retriever: clip-radiology, index: index-radiology}\n"
        "  pathology: {retriever: clip-pathology, index: index-pathology}\n",
    )
    assert read_registry(path)["radiology"].index == artefacts / "index-radiology"
    router = Router.from_registry(path)
    assert router.modalities == ["radiology", "pathology"]
    retriever, index = router.get("pathology")
    assert index.modality == "pathology" and router.get("pathology")[0] is retriever  # loaded once
    with pytest.raises(UnknownModalityError, match="no retriever and index registered for modality 'ophthalmology'"):
        router.get("ophthalmology")


def test_a_wrong_pairing_fails_at_start_up(artefacts):
    swapped = write_registry(
        artefacts, "modalities:\n  radiology: {retriever: clip-pathology, index: index-radiology}\n"
    )
    with pytest.raises(RegistryError, match="radiology.*another retriever"):
        Router.from_registry(swapped)
    wrong_modality = write_registry(
        artefacts, "modalities:\n  pathology: {retriever: clip-radiology, index: index-radiology}\n"
    )
    with pytest.raises(RegistryError, match="indexes radiology reports, not pathology"):
        Router.from_registry(wrong_modality)


@pytest.mark.parametrize("text", ["modalities: []\n", "other: 1\n", "modalities:\n  radiology: {retriever: x}\n"])
def test_malformed_registries(artefacts, text):
    with pytest.raises(RegistryError):
        read_registry(write_registry(artefacts, text))
