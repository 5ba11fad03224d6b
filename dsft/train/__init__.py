"""Training stages and the pieces they share (callbacks, run directory)."""
