"""Sentence-embedding example: all-MiniLM-L6-v2 served through goinfer (Keras 3 on TensorFlow)."""
