"""The scheduler and its components (batcher, weight updater, memory manager, output streamer, invariants)."""
