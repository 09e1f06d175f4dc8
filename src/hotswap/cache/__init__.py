"""KV page bookkeeping and the prefix cache: scheduler state, torch-free (the storage lives in the runner)."""
