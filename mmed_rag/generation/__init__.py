"""Prompt building, generation and checkpoint conversion for the vision-language model."""
