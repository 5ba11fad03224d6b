"""Export a run directory as a plain Hugging Face model directory; merge LoRA adapters tensor by tensor."""
