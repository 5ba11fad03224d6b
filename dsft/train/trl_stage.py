"""What the stages that train with a TRL trainer (reward, dpo) share: preference rows as datasets with sample ids,
TRL's arguments from the train section, and the parts of TRL's trainers dsft replaces with its own.

A stage's trainer class mixes DsftTrainer (staged checkpoints, sample ledger, non-finite flag) into TRL's
trainer: `class X(DsftTrlTrainer, DPOTrainer)`. Both extend transformers' Trainer through its own methods, so
the loss, logging and reference handling are TRL's and the checkpoints and guards dsft's.
"""

from __future__ import annotations

from pathlib import Path

from dsft.config import RunConfig
from dsft.data.columns import FieldMap
from dsft.data.dataset import DataStats
from dsft.data.preference_data import load_pairs, pair_texts
from dsft.errors import DsftError
from dsft.models.load import ADAPTER_CONFIG_FILE
from dsft.train.loop import training_arguments
from dsft.train.trainer import DsftTrainer


class DsftTrlTrainer(DsftTrainer):
    """DsftTrainer's side of a TRL trainer mix: the rows arrive rendered and tokenized, the run directory
    (config.yaml, summary.json) describes the run instead of TRL's model card, and every pair weighs the same in
    its optimizer step.

    TRL's losses are means over a micro-batch, and the Trainer (over accumulation) and the engines (over ranks)
    average micro-batches, so a pair in a smaller micro-batch (an epoch's short last step; under several processes
    data.batches' uneven split) would weigh more. Each training micro-batch's loss is scaled by
    pairs_in_micro_batch x micro_batches_per_step / pairs_in_step: a step's gradient is then the mean over its
    pairs, whatever the split into micro-batches and ranks; full steps are scaled by exactly 1.
    """

    pairs_per_step: int | None = None
    """Pairs in the current optimizer step over all ranks, counted when its micro-batches are fetched."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples and all("sample_id" in batch for batch in batch_samples):  # training batches
            self.pairs_per_step = self.step_totals(batch_samples, lambda batch: [len(batch["sample_id"])])[0]
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = 1.0
        if self.pairs_per_step and model.training and "sample_id" in inputs:
            weight = len(inputs["sample_id"]) * self.micro_batches_per_step / self.pairs_per_step
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if weight == 1.0:
            return result
        return (result[0] * weight, *result[1:]) if return_outputs else result * weight

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # dsft rendered the pairs with the run's chat template, segment by segment, as SFT and generation do;
        # TRL would render them again through the tokenizer's own template, or merge tokens across the boundary.
        return dataset

    def create_model_card(self, *args, **kwargs) -> None:
        # TRL writes its card into args.output_dir at each checkpoint: here the staging directory of checkpoints.
        return None


class WithSampleIds:
    """A TRL collator that also passes each row's sample_id on, for DsftTrainer's ledger (TRL's collators keep
    only the keys they know); DsftTrainer.compute_loss takes it out of the batch before the model sees it."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict:
        import torch

        batch = self.collator(features)
        if "sample_id" in features[0]:
            batch["sample_id"] = torch.tensor([feature["sample_id"] for feature in features], dtype=torch.long)
        return batch


def as_dataset(rows: list[dict], with_sample_ids: bool):
    """rows as a datasets.Dataset (what TRL's trainers take), training rows numbered for the ledger."""
    from datasets import Dataset

    if with_sample_ids:
        rows = [{**row, "sample_id": sample_id} for sample_id, row in enumerate(rows)]
    return Dataset.from_list(rows)


def trl_arguments(config: RunConfig, run_dir: Path, has_validation: bool, args_class, **stage_arguments):
    """args_class (TRL's DPOConfig or RewardConfig) from the train section, with the stage's own fields.

    TRL's defaults that differ from dsft's are overridden: activation checkpointing (TRL: on; dsft turns it on
    with train.gradient_checkpointing through enable_checkpointing, in train.checkpointing's mode) and
    max_length (TRL: 1024; dsft fits the pairs to data.max_length_tokens itself and counts what it cut).
    """
    return training_arguments(config.train, run_dir, has_validation, args_class, activation_checkpointing=False,
                              max_length=None, **stage_arguments)


def router_aux_loss_coef(model) -> float:
    """The MoE router loss weight for TRL's DPO and GRPO trainers: the model's own router_aux_loss_coef when its
    config asks for router logits (output_router_logits), else 0, as in dsft's SFT, where the model's forward decides.

    TRL's default adds the loss whenever the config has the coefficient at all (DeepSeek-V4's does, off by default)
    and then reads config.num_experts, which DeepSeek's configs name n_routed_experts.

    Raises DsftError when the model asks for the loss and its config has no num_experts for TRL to read.
    """
    text_config = model.config.get_text_config()
    if not getattr(text_config, "output_router_logits", False):
        return 0.0
    if not hasattr(text_config, "num_experts"):
        raise DsftError(f"model config output_router_logits: true, but TRL's router loss reads config.num_experts, "
                        f"which {text_config.model_type} does not have; set output_router_logits to false in the "
                        "model's config.json")
    return float(getattr(text_config, "router_aux_loss_coef", 0.0))


def reference_model(config: RunConfig, policy, tokenizer, reference: str | None):
    """The frozen reference model of a DPO or KTO run (reference: the stage's reference setting), or None with
    LoRA and no reference set (the adapter-disabled policy is the reference).

    Raises DsftError when reference cannot be loaded or its tokenizer differs from the policy's.
    """
    import copy

    from dsft.models.load import build_model

    if reference is None:
        if config.method.adapter:
            return None
        model = copy.deepcopy(policy)  # full fine-tuning changes every weight: the start must be kept whole
    else:
        _check_reference_tokenizer(f"{config.stage}.reference", reference, tokenizer)
        source = config.model.model_copy(update={"name_or_path": reference, "preset": None, "revision": None})
        model = build_model(source, tokenizer, config.train.seed)
    model.requires_grad_(False)
    return model.eval()


def reference_description(config: RunConfig, reference: str | None) -> str:
    if reference is not None:
        return reference
    if config.method.adapter:
        return "the policy with its LoRA adapter disabled (no second copy of the weights)"
    return "a frozen copy of the starting model"


def _check_reference_tokenizer(key: str, reference: str, tokenizer) -> None:
    from dsft.data.tokenizer import load_tokenizer
    from dsft.models.load import has_tokenizer_files

    if not has_tokenizer_files(Path(reference)):
        return  # a hub id: its tokenizer is only checked by the vocabulary size build_model sees
    if load_tokenizer(reference).get_vocab() != tokenizer.get_vocab():
        raise DsftError(f"{key} {reference}: its tokenizer differs from the policy's; the log-probabilities "
                        "of the same token ids would not compare (use a model trained with the policy's tokenizer)")


def checkpointing_mode(config: RunConfig) -> str:
    """The activation checkpointing of the run for dsft.models.kernels.enable_checkpointing."""
    return config.train.checkpointing if config.train.gradient_checkpointing else "off"


def training_texts(config: RunConfig):
    """Every string of the training pairs, for training a preset's tokenizer."""
    data = config.data
    yield from pair_texts(load_pairs(data.train_files, data.on_error, DataStats(), data.system_prompt, data.max_samples,
                                     FieldMap.of(data)))


def check_stage_config(config: RunConfig) -> None:
    """Raise DsftError for settings these stages do not apply (rather than ignore them), and for a start from a LoRA
    run directory (an adapter, not full weights)."""
    train = config.train
    unsupported = {
        # Neither stage regroups pairs by a token budget: each packs its batches as they come (batch_size sizes them):
        # DPO below TRL's fused LM head (packed_pairs.py), the reward model through its body (packed_forward.py).
        "train.pack_tokens": train.pack_tokens is not None,
        "method.unfreeze": bool(config.method.unfreeze),
        "train.adversarial": train.adversarial.method != "none",
        "train.liger: on": train.liger == "on",
        "train.chunked_loss: on": train.chunked_loss == "on",  # DPO's log-probs come from TRL's fused LM head
        "train.compile": train.compile,
    }
    for setting, is_set in unsupported.items():
        if is_set:
            raise DsftError(f"{setting} is not supported by stage {config.stage}; remove it from the config")
    _reject_adapter_start(config)


def _reject_adapter_start(config: RunConfig) -> None:
    path = config.model.name_or_path
    if path is not None and (Path(path) / ADAPTER_CONFIG_FILE).is_file():
        raise DsftError(
            f"model.name_or_path {path} holds a LoRA adapter, not full weights; stage {config.stage} starts from full "
            "weights: merge the adapter first (peft: AutoPeftModelForCausalLM.from_pretrained(RUN).merge_and_unload()"
            ".save_pretrained(OUT), then tokenizer.save_pretrained(OUT)) and point at OUT, or train both in one config "
            "with stages (sft, then this stage), which hands over the merged model"
        )


def data_lines(stats: DataStats) -> list[str]:
    """DataStats lines worded for pairs."""
    lines = [line.replace("examples:", "pairs:", 1) for line in stats.lines()]
    return [line.replace("dropped with no trainable token left", "dropped with no differing answer token left")
            for line in lines]


def build_reference_trainer(config: RunConfig, run_dir: Path, policy, reference, tokenizer, train_rows: list[dict],
                            validation_rows: list[dict], console, collator, trainer_class, args):
    """(trainer, Guards) of a stage with a reference model (DPO, KTO): TRL wraps the policy with dsft's adapter
    config itself (and disables that adapter for the reference pass when reference is None).

    Raises DsftError when the adapter's target modules name no module of the model (method.adapter_error).
    """
    from dsft.models.families import model_type_of
    from dsft.models.method import (
        adapter_error,
        check_patterns,
        fused_expert_patterns,
        linear_module_names,
        peft_config,
        refuse_adapter,
    )
    from dsft.train.loop import build_trainer

    adapter = peft_config(config.method, model_type=model_type_of(policy), model=policy) if config.method.adapter else None
    if adapter is not None:
        refuse_adapter(config.method, policy)
    validation = as_dataset(validation_rows, False) if validation_rows else []
    names = sorted(linear_module_names(policy))
    try:
        with fused_expert_patterns():  # TRL wraps the policy with peft_config
            built = build_trainer(config, run_dir, policy, tokenizer, as_dataset(train_rows, True), validation,
                                  console, collator, trainer_class=trainer_class, args=args, ref_model=reference,
                                  peft_config=adapter, packing="own")
    except (ValueError, NotImplementedError) as exc:
        if adapter is None:
            raise
        raise adapter_error(exc, config.method, names) from None
    check_patterns(built[0].model, config.method)
    return built
