"""Compression: pruning (and quantization, next), with its price measured on the user's data."""
