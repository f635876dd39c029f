"""Data stages: `fluid tokenize` (image tokens) and `fluid encode-text` (T5 text embeddings)."""
