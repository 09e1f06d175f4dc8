"""Tiny locally built checkpoints and tokenizers, so tests and the demo need no downloads."""
