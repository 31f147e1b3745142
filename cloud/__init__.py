"""The cloud fallback endpoint (batches and runs model tails for many devices)."""

__all__: list[str] = []
