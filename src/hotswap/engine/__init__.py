"""The frontend: tokenization, request fan-out (n), output assembly, sync and async APIs."""
