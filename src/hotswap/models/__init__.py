"""Model definitions: one decoder covers the Llama, Qwen2 and Qwen3 families."""
