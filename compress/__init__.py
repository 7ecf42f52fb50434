"""Compression algorithms: calibration, quantization (sparsity, pruning, steering, low rank to come)."""
