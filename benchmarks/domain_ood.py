"""How well the domain classifier's defaults separate new medical images from foreign ones, over several towers.

python benchmarks/domain_ood.py [--seeds 4] [--models tiny-clip tiny-clip-rn] [--real ../shared/real-images]

For each (tower, seed) it trains ``train-domain`` at its defaults on the README's retriever phantoms (2,000 images,
467 training images per modality) and reports, at the defaults:

- placed: the share of held-out phantoms (the val and report test files, and 300 phantoms of another generator
  seed) that get a modality rather than ``unknown``, and the share of those placed right;
- foreign: how many of the nine non-medical images (:func:`mmed_rag.testing.non_medical_images`) are ``unknown``,
  and the smallest distance among them (the limit is ``max_distance``);
- real X-rays: the share of the real PneumoniaMNIST test X-rays (when ``--real`` holds them) routed to radiology
  and the share whose best guess is radiology. The classifier never saw a real image: ``unknown`` is its honest
  answer for most of them.

About a minute per (tower, seed) on 2 cores.
"""

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from mmed_rag.data.phantoms import PhantomConfig, make_phantoms
from mmed_rag.data.records import read_records
from mmed_rag.domain.classifier import DomainClassifier, TrainDomainConfig, train_domain
from mmed_rag.testing import non_medical_images

MODALITIES = ("radiology", "pathology", "ophthalmology")


def data_files(root: Path, split: str) -> list[str]:
    if split == "test":
        return [f"{m}={root}/test/report/{m}_test.json" for m in MODALITIES]
    return [f"{m}={root}/training/retriever/{m}/{m}_{split}.json" for m in MODALITIES]


def held_out_images(root: Path, fresh: Path) -> list[Path]:
    """Every image of the val and test files, and of the fresh phantoms: none is a training image."""
    paths = []
    for split in ("val", "test"):
        for entry in data_files(root, split):
            for record in read_records(entry.split("=", 1)[1]).records:
                paths += [root / "images" / image for image in record.image_paths]
    return sorted(set(paths)) + sorted((fresh / "images").glob("*/*.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--models", nargs="+", default=["tiny-clip", "tiny-clip-rn"])
    parser.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "real-images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    archive = args.real / "pneumoniamnist.npz"
    real = [Image.fromarray(x).convert("RGB") for x in np.load(archive)["test_images"]] if archive.is_file() else []
    foreign = non_medical_images()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        make_phantoms(PhantomConfig(out=str(work / "phantoms"), n=2000, size=64))
        make_phantoms(PhantomConfig(out=str(work / "fresh"), n=300, size=64, seed=1))
        held_out = held_out_images(work / "phantoms", work / "fresh")
        truth = [path.parent.name for path in held_out]
        print(f"held-out images: {len(held_out)}; foreign: {len(foreign)}; real X-rays: {len(real) or 'absent'}")
        print(
            f"{'tower':<14} {'seed':>4} {'placed':>7} {'right':>6} {'foreign':>8} {'nearest':>8}"
            + (f" {'real':>6} {'guess':>6}" if real else "")
        )
        summary = []
        for model in args.models:
            for seed in range(args.seeds):
                out = train_domain(
                    TrainDomainConfig(
                        train_files=data_files(work / "phantoms", "train"),
                        val_files=data_files(work / "phantoms", "val"),
                        img_root=str(work / "phantoms" / "images"),
                        model=model,
                        seed=seed,
                        out=str(work / f"{model}-{seed}"),
                        device="cpu",
                    )
                )
                classifier = DomainClassifier.load(out)
                predictions = classifier.predict(held_out)
                placed = [p for p, t in zip(predictions, truth, strict=True) if not p.is_unknown]
                right = sum(p.modality == t for p, t in zip(predictions, truth, strict=True))
                strangers = classifier.predict(list(foreign.values()))
                caught = sum(p.is_unknown for p in strangers)
                nearest = min(p.distance for p in strangers)
                row = [len(placed) / len(held_out), right / max(len(placed), 1), caught, nearest]
                line = f"{model:<14} {seed:>4} {row[0]:>7.3f} {row[1]:>6.3f} {caught:>6}/{len(foreign)} {nearest:>8.2f}"
                if real:
                    routed = classifier.predict(real)
                    row += [np.mean([p.modality == "radiology" for p in routed])]
                    row += [np.mean([p.best_guess == "radiology" for p in routed])]
                    line += f" {row[4]:>6.3f} {row[5]:>6.3f}"
                print(line, flush=True)
                summary.append(row)
        table = np.array(summary)
        print(
            f"over {len(summary)} towers: placed {table[:, 0].min():.3f}-{table[:, 0].max():.3f}, right "
            f"{table[:, 1].min():.3f}-{table[:, 1].max():.3f}, foreign unknown {int(table[:, 2].sum())}/"
            f"{len(foreign) * len(summary)}, nearest foreign distance {table[:, 3].min():.2f} (limit "
            f"{classifier.max_distance})"
            + (f", real X-rays routed to radiology {table[:, 4].min():.3f}-{table[:, 4].max():.3f}" if real else "")
        )


if __name__ == "__main__":
    main()
