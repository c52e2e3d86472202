"""Classical baseline (placeholder; being written)."""
