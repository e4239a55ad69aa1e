"""PyTorch side: models, data sets, training loops, evaluation (imports torch)."""
