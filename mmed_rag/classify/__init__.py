"""Image classifiers on CLIP embeddings: the machinery the domain classifier and DAMON's finding classifier share."""
