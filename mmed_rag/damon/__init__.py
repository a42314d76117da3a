"""DAMON (Zhang et al.): difference-aware multi-image medical VQA, on mmed-rag's records, generator and stages."""
