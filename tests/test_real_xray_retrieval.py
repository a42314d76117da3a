"""Optional real-image check: a tiny retriever fine-tuned on real chest X-rays (PneumoniaMNIST) retrieves the
report of the right label more often than chance. Skipped where ../shared/real-images is absent."""

import json

import numpy as np
from PIL import Image

from mmed_rag.retrieval.batch import load_retriever
from mmed_rag.retrieval.encode import encode_images
from mmed_rag.retrieval.evaluate import score_retrieval
from mmed_rag.retrieval.finetune import FinetuneConfig, finetune_clip
from mmed_rag.retrieval.index import ReportIndex

REPORTS = {
    0: "The lungs are clear. No focal consolidation. Normal chest radiograph.",
    1: "Patchy airspace opacities in both lungs, consistent with pneumonia.",
}


def write_split(root, images, labels, split, count):
    """``count`` seeded-random images of a split as PNGs, one retriever record each (a one-line report per label)."""
    records = []
    for index in np.random.default_rng(0).permutation(len(images))[:count].tolist():
        path = f"{split}/{index}.png"
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(root / "images" / path)
        label = int(np.ravel(labels[index])[0])
        records.append({"id": f"{split}_{index}", "report": REPORTS[label], "image_path": [path], "label": label})
    (root / f"{split}.json").write_text(json.dumps(records))
    return root / f"{split}.json"


def test_retriever_learns_pneumonia_from_real_xrays(real_xrays, tmp_path):
    arrays = np.load(real_xrays)
    train = write_split(tmp_path, arrays["train_images"], arrays["train_labels"], "train", 600)
    val = write_split(tmp_path, arrays["val_images"], arrays["val_labels"], "val", 120)
    test = write_split(tmp_path, arrays["test_images"], arrays["test_labels"], "test", 200)
    retriever_dir = finetune_clip(
        FinetuneConfig(
            train_data=str(train),
            val_data=str(val),
            img_root=str(tmp_path / "images"),
            dataset_type="radiology",
            model="tiny-clip-rn",
            batch_size=32,
            lr=1e-3,
            warmup=10,
            epochs=3,
            workers=0,
            precision="fp32",
            logs=str(tmp_path / "runs"),
        )
    )
    index = ReportIndex.build(retriever_dir, train, "radiology", progress=False)
    assert index.size == 2  # one report per label
    retriever = load_retriever(str(retriever_dir), None)
    records = json.loads(test.read_text())
    queries = encode_images(
        retriever.model,
        retriever.preprocess,
        tmp_path / "images",
        [r["image_path"][0] for r in records],
        progress=False,
    )
    scores = score_retrieval(index, queries, [(r["report"], None) for r in records], ks=(1,))
    assert scores.chance[1] == 0.5
    assert scores.recall[1] >= 0.7, scores.recall
