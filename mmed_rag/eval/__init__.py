"""Evaluation: VQA and report metrics and the copy-reliance analyses."""
