"""Weights: HF-name mapping onto fused parameters, checkpoint formats, transports, checksums, saving."""
