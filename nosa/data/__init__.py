"""Data below training and evaluation: local text corpora, synthetic long-context tasks, tokenization, row packing."""
