"""What a domain prediction is, and where an image goes with it: the modality's retriever, or the caller's fallback.

The classifier (:mod:`mmed_rag.domain.classifier`) says which modality an image is, or :data:`UNKNOWN` when it
cannot place it. Which retrievers to query is the caller's decision, made by :func:`route` from the prediction,
the modalities it has retrievers for, and its :data:`UnknownPolicy`. Everything here is pure: plain data in,
plain data out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

UNKNOWN = "unknown"
#: What to retrieve from for an image the classifier cannot place: the caller's default modality, every
#: modality, or none (generate without retrieved reports). See :func:`route`.
UnknownPolicy = Literal["default", "all", "none"]
UNKNOWN_POLICIES: tuple[str, ...] = ("default", "all", "none")


@dataclass(frozen=True)
class DomainPrediction:
    """The modality of one image, or :data:`UNKNOWN` when it is ambiguous or unfamiliar.

    Ambiguous: ``probability`` is below the threshold; unfamiliar: ``distance`` is above the limit (see
    :mod:`mmed_rag.domain.classifier`).

    ``best_guess`` is the most probable modality either way, ``probability`` its probability, and
    ``probabilities`` holds every modality's, in the classifier's label order. ``distance`` says how far the
    image lies from the nearest training image of ``best_guess`` (1 or less for 99.5% of those images, each
    measured against the others). ``image`` is the path the image was given by (``None`` for an in-memory image).
    """

    modality: str
    probability: float
    probabilities: dict[str, float]
    best_guess: str
    distance: float
    image: str | None = None

    @property
    def is_unknown(self) -> bool:
        return self.modality == UNKNOWN

    def to_dict(self) -> dict:
        return {
            "image": self.image,
            "modality": self.modality,
            "probability": self.probability,
            "probabilities": self.probabilities,
            "best_guess": self.best_guess,
            "distance": self.distance,
        }


def is_placed(
    probability: np.ndarray | float, distance: np.ndarray | float, threshold: float, max_distance: float | None
) -> np.ndarray | bool:
    """Whether a best guess stands: probable enough and near enough to its modality's training images."""
    near = True if max_distance is None else distance <= max_distance
    return (probability >= threshold) & near


def decide(
    probabilities: np.ndarray,
    distances: np.ndarray,
    modalities: Sequence[str],
    threshold: float,
    max_distance: float | None,
    image: str | None = None,
) -> DomainPrediction:
    """The prediction for one image from its probabilities and its distances to each modality's training images.

    The best guess is the most probable modality; it is reported as :data:`UNKNOWN` when its probability is below
    ``threshold`` or its distance above ``max_distance`` (``None``: no distance limit).
    """
    best = int(np.argmax(probabilities))
    placed = bool(is_placed(probabilities[best], distances[best], threshold, max_distance))
    return DomainPrediction(
        modality=modalities[best] if placed else UNKNOWN,
        probability=float(probabilities[best]),
        probabilities={name: float(p) for name, p in zip(modalities, probabilities, strict=True)},
        best_guess=modalities[best],
        distance=float(distances[best]),
        image=image,
    )


def route(
    prediction: DomainPrediction,
    policy: UnknownPolicy,
    default_modality: str | None,
    known_modalities: Sequence[str],
) -> list[str]:
    """The modalities whose retrievers an image is sent to.

    ``known_modalities`` are those the caller has a retriever for. An image placed in one of them goes to it
    alone. An image the classifier could not place (:data:`UNKNOWN`), or placed in a modality the caller has no
    retriever for, follows ``policy``:

    - ``"default"``: ``[default_modality]``, e.g. the pipeline's main modality;
    - ``"all"``: every known modality, in the given order (the caller merges or chooses among the results);
    - ``"none"``: ``[]``, no retrieval: answer from the image alone rather than from another modality's reports.

    ``policy`` and ``default_modality`` are checked on every call, so a wrong setting fails on the first image,
    not on the first unknown one.
    """
    if policy not in UNKNOWN_POLICIES:
        raise ValueError(f"policy: expected one of {', '.join(UNKNOWN_POLICIES)}, got {policy!r}")
    if policy == "default" and default_modality not in known_modalities:
        raise ValueError(
            f"policy 'default' needs default_modality among the known modalities {list(known_modalities)}, "
            f"got {default_modality!r}"
        )
    if prediction.modality in known_modalities:
        return [prediction.modality]
    if policy == "default":
        return [default_modality]
    if policy == "all":
        return list(known_modalities)
    return []
