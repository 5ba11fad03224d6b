"""The transformers Trainer, extended where it offers hooks: atomic checkpoints, a sample ledger, loss checks.

`compute_loss`, `training_step` and `get_train_dataloader` are the documented places to customise a Trainer; checkpoint
saving has no public hook, so `_save_checkpoint` is wrapped (not rewritten): the Trainer writes
into a staging directory and dsft publishes the result (see checkpoints.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import Trainer, TrainerCallback

from dsft.data.batches import EpochBatchSampler
from dsft.errors import DsftError
from dsft.models.chunked_loss import chunked_lm_loss
from dsft.train import checkpoints as ckpt
from dsft.train.distributed import enable_fsdp_on_cpu, gather_lists, is_main

SAMPLES_FILE = "samples.jsonl"


class SampleLedger(TrainerCallback):
    """Writes which training samples each optimizer step consumed to samples.jsonl.

    Proves exact resume (no sample skipped or repeated) and lets a user trace a loss spike to data.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / SAMPLES_FILE
        self._pending: list[int] = []

    def record(self, sample_ids) -> None:
        self._pending.extend(int(i) for i in sample_ids)

    def on_step_end(self, args, state, control, **kwargs):
        sample_ids = gather_lists(self._pending)  # every rank's share of the step, in rank order
        self._pending = []
        if not is_main():
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, "sample_ids": sample_ids}) + "\n")


class DsftTrainer(Trainer):
    """Trainer with staged, manifested checkpoints, a sample ledger and a non-finite loss flag."""

    micro_batches_per_step: int = 1
    """Micro-batches in the current optimizer step over all ranks (set by step_totals)."""

    def __init__(self, *args, ledger: SampleLedger, keep_last_checkpoints: int, adversary=None,
                 loss_chunk_tokens: int | None = None, whole_epochs: bool = False,
                 loraplus_lr_ratio: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        """LoRA+ (method.lora.plus_lr_ratio): the B matrices' learning rate over the rest's, or None."""
        self.whole_epochs = whole_epochs
        """Under several processes, deal each epoch's samples over the ranks exactly once (data.batches) instead of
        accelerate's even batches, which repeat samples from the epoch's start to fill a short last step."""
        self.model_dtypes = {name: param.dtype for name, param in self.model.named_parameters()}
        """Each weight's dtype before an engine wraps the model: what a one-process run saves (see
        distributed.gathered_state_dict)."""
        self.ledger = ledger
        self.loss_chunk_tokens = loss_chunk_tokens
        """Tokens per chunk of the chunked causal-LM loss (train.chunked_loss), or None for the model's own loss."""
        self.chunked_loss_micro_batches = 0
        """Training micro-batches of this process whose loss the chunked loss computed (summary.json's speed)."""
        self.adversary = adversary
        """An EmbeddingAdversary (train.adversarial) that adds attack passes to each step, or None."""
        self.keep_last_checkpoints = keep_last_checkpoints
        self.nonfinite_loss_seen = False
        """Set when a micro-batch loss is NaN/inf; the non-finite guard reads and clears it."""
        self.moe_aux = None
        """(ExpertLoads, method.moe.aux_loss) when auxiliary balance losses are on (train/moe.py), else None."""
        self.moe_training = None
        """The MoeTraining callback of an MoE model (train/moe.py), else None."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            self.is_fsdp_enabled = enable_fsdp_on_cpu(self.accelerator, self.args.fsdp_plugin_args)

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if self.whole_epochs and self.accelerator.num_processes > 1:
            deal_whole_epochs(loader, self.args.gradient_accumulation_steps)
        return loader

    def step_totals(self, batch_samples: list[dict], counts) -> list[int]:
        """Sums over an optimizer step's micro-batches on every rank of counts(batch) (a list of numbers per
        micro-batch), for losses that weigh each item of a step the same (trl_stage, multitask). Also sets
        micro_batches_per_step. A collective: every rank calls it for every step."""
        import torch

        local = torch.tensor([list(map(int, counts(batch))) for batch in batch_samples], dtype=torch.long,
                             device=self.args.device).sum(dim=0)
        self.micro_batches_per_step = len(batch_samples) * self.accelerator.num_processes
        return [int(total) for total in self.accelerator.reduce(local, reduction="sum")]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sample_ids = inputs.pop("sample_id", None)
        if sample_ids is not None and model.training:
            self.ledger.record(sample_ids.tolist())
        if self._chunked_loss_applies(model, inputs, return_outputs):
            # The model's own loss would hold the logits of every token at once (see chunked_loss.py); the divisor
            # is the one the model would get, so the Trainer's scaling for gradient accumulation stays right.
            items = num_items_in_batch if self.model_accepts_loss_kwargs else None
            loss = chunked_lm_loss(model, inputs, self.loss_chunk_tokens, items)
            self.chunked_loss_micro_batches += model.training
            if self.args.average_tokens_across_devices and items is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does for the model's loss
            return self._with_balance_loss(loss, num_items_in_batch)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if isinstance(result, tuple):
            return (self._with_balance_loss(result[0], num_items_in_batch), *result[1:])
        return self._with_balance_loss(result, num_items_in_batch)

    def _with_balance_loss(self, loss, num_items_in_batch):
        """loss plus method.moe's auxiliary balance losses of the forward just run (train/moe.py), weighted so a
        step's total is their mean over its micro-batches whatever the Trainer's scaling for accumulation."""
        if self.moe_aux is None:
            return loss
        from dsft.models.moe import balance_losses

        loads, settings = self.moe_aux
        aux = balance_losses(loads.take_routed(), loads.routers, settings)
        if aux is None:
            return loss
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:  # as Trainer.training_step decides whether it divides the loss by the accumulation
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        weight = 1.0 / self.current_gradient_accumulation_steps if scaled else 1.0
        if self.moe_training is not None:
            self.moe_training.add_aux(aux)
        return loss + weight * aux.to(loss.dtype)

    def _chunked_loss_applies(self, model, inputs, return_outputs: bool) -> bool:
        # Evaluation asks for the outputs (logits).
        return (self.loss_chunk_tokens is not None and not return_outputs and "labels" in inputs
                and self.compute_loss_func is None and self.label_smoother is None)

    def training_step(self, model, inputs, num_items_in_batch=None):
        one_pass = super().training_step  # forward, loss scaled for accumulation, backward
        if self.adversary is None:
            loss = one_pass(model, inputs, num_items_in_batch)
        else:
            unledgered = {k: v for k, v in inputs.items() if k != "sample_id"}  # the ledger counts a batch once
            loss = self.adversary.step(lambda: one_pass(model, inputs, num_items_in_batch),
                                       lambda: one_pass(model, unledgered, num_items_in_batch))
        if not bool(loss.isfinite()):
            self.nonfinite_loss_seen = True
        return loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if _is_peft(model or self.model) or self.is_fsdp_enabled:  # FSDP: accelerate loads into the shards
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # The Trainer's own loader matches keys literally (strict=False), but save_pretrained writes
        # MoE experts in the per-expert layout of transformers v4, so fused expert weights would be
        # left as initialised without a word; from_pretrained converts them, and strict loading
        # fails loudly on anything else that does not match.
        _load_full_weights(model or self.model, resume_from_checkpoint)

    def _load_best_model(self):
        if _is_peft(self.model):
            return super()._load_best_model()
        _load_full_weights(self.model, self.state.best_model_checkpoint)

    def create_optimizer(self, *args, **kwargs):
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(*args, **kwargs)
        from dsft.train.adapters import loraplus_optimizer

        self.optimizer = loraplus_optimizer(self, self.loraplus_lr_ratio)
        return self.optimizer

    def _save_checkpoint(self, model, trial):
        root = Path(self.args.output_dir)
        staging_root = root / ckpt.STAGING_DIR
        if self.is_world_process_zero():
            shutil.rmtree(staging_root, ignore_errors=True)  # what a crash in an earlier save left
        self.accelerator.wait_for_everyone()  # sharded engines: every rank writes its shard into the staging dir
        self.args.output_dir = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
        except OSError as exc:
            staged_bytes = ckpt.directory_bytes(staging_root)
            shutil.rmtree(staging_root, ignore_errors=True)
            raise ckpt.write_error(exc, root, staged_bytes) from exc
        finally:
            self.args.output_dir = str(root)
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            self._publish(root, staging_root)
        self.accelerator.wait_for_everyone()  # no rank goes on (or resumes) before the checkpoint is published

    def _publish(self, root: Path, staging_root: Path) -> None:
        staged = staging_root / f"checkpoint-{self.state.global_step}"
        best = self._point_best_at(root, staged)
        try:
            ckpt.publish(staged, root, self.state.global_step)
        except OSError as exc:
            raise ckpt.write_error(exc, root, ckpt.directory_bytes(staging_root)) from exc
        ckpt.rotate(root, self.keep_last_checkpoints, protect=best)

    def _point_best_at(self, root: Path, staged: Path) -> Path | None:
        """The Trainer looked for the best checkpoint in the staging dir; point it at the published one."""
        if not self.state.best_global_step:
            return None
        best = root / f"checkpoint-{self.state.best_global_step}"
        self.state.best_model_checkpoint = str(best)
        self.state.save_to_json(str(staged / "trainer_state.json"))
        return best


def deal_whole_epochs(loader, grad_accum_steps: int) -> None:
    """Make accelerate's shard of a multi-process training loader deal whole epochs: the fixed-size batch sampler
    inside its BatchSamplerShard becomes an EpochBatchSampler over the same (shuffled, seeded) sampler, so a
    one-process run with batch B x world_size and this run train on the same samples in every step.

    Loss over uneven micro-batches: the causal-LM loss (sft) and the compute_loss_func of classification and token
    classification divide by the items of the whole step, summed over ranks (num_items_in_batch with
    average_tokens_across_devices), so a micro-batch's size changes no sample's weight. Remaining bias: with class
    weights, a classification micro-batch's weighted mean counts by its share of the step's samples, not of the
    step's class weight (as under accumulation in one process); MultitaskModel's per-head losses are means per
    micro-batch (accepts_loss_kwargs False), each micro-batch weighing alike, so in the short (or folded) step of an
    epoch that does not divide, a sample counts 1/b in a micro-batch of b and 1/(b + 1) in one of b + 1 -- as those
    means already weigh unequal numbers of labelled items per micro-batch.

    Raises DsftError when the loader is not the shape accelerate builds for a map-style dataset (it would repeat
    samples) or the data cannot fill one optimizer step (see data.batches.micro_batch_sizes)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    shard = getattr(loader, "batch_sampler", None)
    if not isinstance(shard, BatchSamplerShard) or shard.split_batches or type(shard.batch_sampler) is not BatchSampler:
        raise DsftError(f"cannot shard the training data per rank: accelerate gave {type(shard).__name__}, "
                        "expected a BatchSamplerShard over a BatchSampler (a map-style dataset)")
    fixed = shard.batch_sampler
    shard.batch_sampler = EpochBatchSampler(fixed.sampler, fixed.batch_size, shard.num_processes, grad_accum_steps)
    shard.batch_size = None  # BatchSamplerShard copied it from the sampler it was given; see EpochBatchSampler


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def _load_full_weights(model, checkpoint: str) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        # A composed module (multitask: a backbone and heads) has no from_pretrained; the Trainer saved its
        # state dict as it is in memory to model.safetensors, so it loads back key for key.
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(Path(checkpoint) / "model.safetensors")), strict=True)
        return
    loaded = type(model).from_pretrained(checkpoint, dtype=model.dtype, use_safetensors=True)
    model.load_state_dict(loaded.state_dict(), strict=True)
