"""Config section train: optimizer, schedule, precision, logging, checkpoints, speed switches and engines."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dsft.config.base import Section


class AdversarialConfig(Section):
    method: Literal["none", "fgm", "pgd"] = "none"
    """Adversarial training on the input embeddings: fgm (one step along the gradient) or pgd (several projected steps)."""
    epsilon: float = Field(1.0, gt=0)
    """L2 norm of the embedding perturbation (fgm), or the radius it is projected into (pgd)."""
    pgd_steps: int = Field(3, ge=1)
    """Ascent steps of pgd."""
    pgd_alpha: float = Field(0.3, gt=0)
    """L2 norm of each pgd ascent step."""


class TrainConfig(Section):
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate of AdamW."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = Field(None, ge=1)
    """Total optimizer steps; overrides epochs."""
    batch_size: int = Field(4, ge=1)
    """Sequences per device per forward pass."""
    grad_accum_steps: int = Field(1, ge=1)
    """Forward passes accumulated into one optimizer step."""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup; exclusive with lr_warmup_ratio."""
    lr_warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of all steps used for warmup."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW decoupled weight decay."""
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """AdamW beta1."""
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    """AdamW beta2."""
    max_grad_norm: float = Field(1.0, ge=0.0)
    """Gradient clipping by global L2 norm; 0 turns clipping off."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision; auto: bf16 on CUDA that supports it, else none."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = 42
    """Seed of weights init, data order, dropout and the validation split."""
    logging_steps: int = Field(10, ge=1)
    """Optimizer steps between log lines (metrics.jsonl, TensorBoard, progress)."""
    eval_steps: int | None = Field(None, ge=1)
    """Optimizer steps between validation passes; default: once at the end."""
    save_steps: int | None = Field(None, ge=1)
    """Optimizer steps between checkpoints (for --resume); default: no intermediate checkpoints."""
    keep_last_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk; older ones are deleted."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without a better validation loss (needs eval_steps)."""
    tensorboard: bool = True
    """Write TensorBoard event files under the run directory."""
    packing: bool = False
    """Padding-free packing, attention kept within each sample. Stage sft on task causal_lm: samples grouped best-fit
    into rows of pack_tokens. Every other stage and task: each batch as it comes runs as one row of its real tokens
    (dpo: its chosen and rejected answers; the rest through the model body, whose outputs return to the padded layout)."""
    pack_tokens: int | None = Field(None, ge=8)
    """Token budget of one packed row (stage sft, task causal_lm); default batch_size x data.max_length_tokens."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss or gradient: stop before the optimizer applies it, or skip that step (counted)."""
    max_consecutive_nonfinite: int = Field(3, ge=1)
    """With nonfinite: skip, stop after this many non-finite steps in a row."""
    auto_find_batch_size: bool = False
    """On CUDA out-of-memory, halve batch_size and retry (the effective batch shrinks with it)."""
    adversarial: AdversarialConfig = AdversarialConfig()
    """Adversarial training (FGM/PGD on input embeddings), off by default."""
    liger: Literal["auto", "on", "off"] = "auto"
    """Liger Kernel's RMSNorm, RoPE and SwiGLU kernels; auto: on CUDA when liger-kernel is installed and the architecture
    is a dense one it covers (llama, mistral, qwen2, qwen3); off for DeepSeek V2/V3 (see dsft/models/kernels.py)."""
    chunked_loss: Literal["auto", "on", "off"] = "auto"
    """Causal-LM loss computed over chunks of tokens from the hidden states, never holding full-vocabulary logits;
    auto: on CUDA (on CPU the model's own loss)."""
    loss_chunk_tokens: int = Field(4096, ge=16)
    """Tokens per chunk of the chunked loss."""
    experts: Literal["auto", "eager", "grouped_mm", "batched_mm"] = "auto"
    """MoE expert kernel (transformers experts_implementation; grouped_mm also computes LoRA on the experts as grouped
    low-rank products); auto: grouped_mm where torch has a grouped GEMM for the device, else eager."""
    fused_optimizer: Literal["auto", "on", "off"] = "auto"
    """Fused AdamW (one kernel for all parameters; CUDA and CPU); auto: on."""
    compile: bool = False
    """torch.compile each decoder layer before training."""
    checkpointing: Literal["full", "selective", "offload"] = "full"
    """With gradient_checkpointing: full recomputes each layer; selective keeps attention outputs and recomputes the
    rest; offload is full with what the recompute needs held in pinned CPU memory (CUDA only; full on CPU)."""
    distributed: Literal["ddp", "zero2", "zero3", "zero3_offload", "fsdp2"] = "ddp"
    """How several processes (dsft train --nproc N) share the work: ddp replicates the model; zero2 shards optimizer
    states and gradients (DeepSpeed); zero3 also shards the weights; zero3_offload keeps optimizer states and weights
    in CPU memory; fsdp2 shards like zero3 with PyTorch FSDP2. One process: ignored. dsft plan estimates each."""

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.lr_warmup_steps and self.lr_warmup_ratio:
            raise ValueError("set train.lr_warmup_steps or train.lr_warmup_ratio, not both")
        if self.early_stopping_patience is not None:
            if self.eval_steps is None:
                raise ValueError("train.early_stopping_patience needs train.eval_steps")
            if self.save_steps is not None and self.save_steps % self.eval_steps:
                raise ValueError("with early stopping, train.save_steps must be a multiple of train.eval_steps")
        return self
