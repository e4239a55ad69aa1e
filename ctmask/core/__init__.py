"""Numpy-only building blocks shared by training, export and runtime (never imports torch)."""
