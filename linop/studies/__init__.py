"""Studies: verification (seed 000), reconstruction and post-training (seed 001)."""
