"""Model runner: owns the model, the KV cache pool, attention backends, sampling and CUDA graphs."""
