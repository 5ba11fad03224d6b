"""Loading, presets, tokenizers and training methods."""
