"""GRPO, top to bottom: config -> tokenizer -> prompts -> rewards -> policy -> TRL's GRPOTrainer -> run directory.

Group relative policy optimization (DeepSeekMath, DeepSeek-R1): for each prompt the policy samples a group
of completions, each completion's advantage is its reward relative to the group's (minus the group mean,
divided by the group's standard deviation), and the policy maximizes the clipped ratio objective of PPO with
those advantages minus a KL penalty to the reference model. No value model is learned.

The loop is TRL's GRPOTrainer with loss_type "grpo": each completion's token losses are averaged over its
length, then over the completions, which is the objective as DeepSeekMath writes it (1/G sum_i 1/|o_i|
sum_t). TRL's default "dapo" averages over all tokens of the batch instead (no length bias); dsft keeps
DeepSeek's method. dsft supplies the prompts (rendered as SFT and `dsft generate` render them: the
trainer's prompt tokenization is replaced by dsft's ids), the reward components (each logged as
reward_<name>), the method, callbacks for metrics.jsonl and the progress bar, atomic checkpoints and the
run directory. With LoRA the reference is the model with its adapter disabled; with full fine-tuning a
frozen copy of the starting weights.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rich.console import Console
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from trl import GRPOTrainer

from dsft.config import RunConfig
from dsft.data.prompts import RlPrompt
from dsft.errors import DsftError
from dsft.models.load import BASE_MODEL_DIR
from dsft.models.method import apply_method, count_parameters
from dsft.train import run_dir as rd
from dsft.train.adapters import adapter_precision, initialise_adapter
from dsft.train.callbacks import MetricsCallback, RichProgressCallback
from dsft.train.guards import NonFiniteGuard, StopOnSignal
from dsft.train.loop import (
    Guards,
    checkpoint_to_resume,
    data_fingerprints,
    pack_batches,
    run_summary,
    save_model,
    track,
    train_guarded,
    training_arguments,
)
from dsft.train.moe import setup_moe
from dsft.train.rewards import Completions, RewardComponent, build_rewards, consecutive_groups, score
from dsft.train.rl_common import (
    exact_match_summary,
    held_out_exact_match,
    held_out_examples,
    load_prompts,
    print_summary,
    refuse_settings,
    reward_summary,
    tensorboard_writer,
)
from dsft.train.trainer import DsftTrainer, SampleLedger
from dsft.train.trl_stage import router_aux_loss_coef

TRL_METRIC_NAMES = {
    "kl": "kl",
    "entropy": "entropy",
    "clip_ratio/region_mean": "clip_fraction",
    "clip_ratio/low_mean": "clip_fraction_low",
    "clip_ratio/high_mean": "clip_fraction_high",
    "completions/mean_length": "completion_length_tokens",
    "completions/clipped_ratio": "truncated_fraction",
    "frac_reward_zero_std": "zero_spread_group_fraction",
}
"""TRL's metric name -> dsft's in metrics.jsonl (reward, reward_std and each reward_<name> are added apart)."""


@dataclasses.dataclass
class GrpoResult:
    run_dir: Path
    summary: dict
    model: object
    """The trained policy in memory (a PeftModel for LoRA)."""
    tokenizer: object
    trainer: object
    """The GRPOTrainer, for inspecting what it logged (trainer._logs holds the last batch's rewards and advantages)."""


def run_grpo(
    config: RunConfig, resume: bool = False, console: Console | None = None, resume_command: str = "dsft train CONFIG --resume"
) -> GrpoResult:
    """Train the policy with GRPO as the config says and write the run directory.

    Raises DsftError for bad input (including a batch that does not hold whole groups), TrainingInterrupted
    after a signal and TrainingDiverged on a non-finite loss or gradient, as run_sft does.
    """
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    console = console or Console(soft_wrap=True)
    hf_logging.disable_progress_bar()
    started_s = time.perf_counter()
    _check_settings(config)
    run_dir = rd.prepare_run_dir(config.output, resume)
    console.print(f"run directory: {run_dir}")

    # Setup: tokenizer, the template generation uses, then prompts rendered with it and the reward components.
    set_seed(config.train.seed)
    config, tokenizer, prompts, stats = load_prompts(config, run_dir)
    console.print(f"data: {len(prompts):,} prompts ({stats.dropped_too_long:,} over data.max_length_tokens left out), "
                  f"{sum(p.reference is not None for p in prompts):,} with a reference answer")
    grpo = config.grpo
    components = build_rewards(grpo.rewards, "grpo.rewards", grpo.sampling.max_new_tokens)
    console.print("reward: " + " + ".join(f"{c.weight:g} x {c.name}" for c in components))
    eval_examples = held_out_examples(config, console)

    # Policy and method; the reference is what the policy starts as.
    model = rd.start_model(config, tokenizer, run_dir, console)  # an adapter's preset base saved in base_model/
    _point_reference_at_start(model, config, run_dir)
    model = apply_method(model, config.method)
    counts = count_parameters(model)
    console.print(f"method {config.method.type}: {counts.line()}")
    if config.train.packing:  # TRL's log-prob passes (policy, reference) run each batch packed; generation does not
        pack_batches(model, config, console, "each batch of prompts and completions")

    # Train.
    trainer, guards = _build_trainer(config, run_dir, model, tokenizer, prompts, components, console)
    before = held_out_exact_match(model, tokenizer, eval_examples, config, console, "before training")
    checkpoint = checkpoint_to_resume(run_dir, console) if resume else None
    train_output = train_guarded(trainer, guards, checkpoint, config.train, resume_command)

    # Save: adapter or full model, tokenizer, then the numbers.
    save_model(trainer, tokenizer, run_dir, config)
    after = held_out_exact_match(trainer.model, tokenizer, eval_examples, config, console, "after training")
    summary = run_summary(config, train_output, None, stats, counts, started_s, trainer)
    # The trainer's log history holds TRL's names: the metrics.jsonl records are the renamed ones.
    renamer = DsftMetricNames([c.name for c in components])
    summary.update(reward_summary([renamer.renamed(r) for r in trainer.state.log_history], [c.name for c in components]))
    summary.update(exact_match_summary(before, after), nonfinite_skipped_steps=guards.nonfinite.skipped_steps,
                   data_fingerprints=data_fingerprints(config.data), loss_type=trainer.args.loss_type)
    rd.write_summary(run_dir, summary, guards.metrics.tracker)
    print_summary(console, summary, run_dir)
    return GrpoResult(run_dir, summary, trainer.model, tokenizer, trainer)


def _check_settings(config: RunConfig) -> None:
    """Refuse a batch that does not hold whole groups, and settings the GRPO loop would silently ignore."""
    train, grpo = config.train, config.grpo
    completions_per_step = train.batch_size * train.grad_accum_steps
    if completions_per_step % grpo.group_size:
        raise DsftError(f"train.batch_size x train.grad_accum_steps ({completions_per_step}) counts completions per step "
                        f"and must be a multiple of grpo.group_size ({grpo.group_size}): every group is scored whole")
    refuse_settings(config, "grpo")


def _point_reference_at_start(model, config: RunConfig, run_dir: Path) -> None:
    """Keep what the policy starts as where the reference and the saved adapter will find it.

    A preset exists nowhere else: its random-init weights are saved in the run's base_model/ (a LoRA adapter
    names it as its base, as SFT's does). With full or freeze training and a KL penalty, TRL loads the
    reference from the policy's config._name_or_path: that becomes the start, made absolute (with LoRA the
    reference is the adapter-disabled model and nothing is loaded).
    """
    needs_reference = not config.method.adapter and config.grpo.kl_coef > 0
    if config.model.preset is not None and (config.method.adapter or needs_reference):
        base = run_dir / BASE_MODEL_DIR if config.method.adapter else rd.save_base(model, run_dir)
        model.config._name_or_path = str(base.resolve())
    elif needs_reference and Path(config.model.name_or_path).exists():
        model.config._name_or_path = str(Path(config.model.name_or_path).resolve())


def _build_trainer(config: RunConfig, run_dir: Path, model, tokenizer, prompts, components, console):
    """DsftGrpoTrainer with dsft's callbacks and guards (as loop.build_trainer gives the other stages)."""
    from datasets import Dataset
    from transformers import PrinterCallback

    metrics, stop_on_signal = MetricsCallback(run_dir, track(config, run_dir, console)), StopOnSignal()
    progress = RichProgressCallback(console, metrics)
    progress.status_keys = {"reward": "reward", "kl": "kl"}  # shown after the loss on the progress bar
    callbacks = [DsftMetricNames([c.name for c in components]), metrics, progress, stop_on_signal]
    writer = tensorboard_writer(run_dir) if config.train.tensorboard else None
    if writer is not None:
        callbacks.append(TensorBoardCallback(tb_writer=writer))
    rows = Dataset.from_list([{"prompt": p.text} for p in prompts])
    by_text = {p.text: p for p in prompts}
    trainer = DsftGrpoTrainer(
        model=model,
        reward_funcs=[TrlReward(component, config.grpo.group_size, by_text) for component in components],
        args=grpo_arguments(config, run_dir, router_aux_loss_coef(model)),
        train_dataset=rows,
        processing_class=tokenizer,
        callbacks=callbacks,
        prompt_ids={p.text: list(p.ids) for p in prompts},
        ledger=SampleLedger(run_dir),  # not a callback: GRPO batches are sampled completions, not data rows
        keep_last_checkpoints=config.train.keep_last_checkpoints,
        loraplus_lr_ratio=config.method.lora.plus_lr_ratio if config.method.lora_family else None,
    )
    if "ref" in getattr(trainer.model, "peft_config", {}):
        # TRL copies a given adapter as a "ref" adapter, for re-training a pretrained one. dsft's adapter is new
        # (LoRA's B = 0), so the adapter-disabled model is the same reference, with no second adapter to keep or save.
        trainer.model.delete_adapter("ref")
    trainer.remove_callback(PrinterCallback)
    adapter_precision(trainer, config)
    initialise_adapter(trainer.model, config, run_dir)
    moe = setup_moe(trainer, config, run_dir, [{"prompt_ids": list(p.ids)} for p in prompts], console, writer)
    nonfinite = NonFiniteGuard(trainer, config.train.nonfinite, config.train.max_consecutive_nonfinite,
                               not trainer.args.fp16, console.print)
    trainer.add_callback(nonfinite)
    if moe is not None:
        moe.nonfinite = nonfinite
    return trainer, Guards(metrics, nonfinite, stop_on_signal, progress, moe)


def grpo_arguments(config: RunConfig, run_dir: Path, aux_loss_coef: float = 0.0):
    """TRL's GRPOConfig: dsft's training arguments (as every stage has them) plus the grpo section, with the MoE
    router loss weighted by aux_loss_coef (trl_stage.router_aux_loss_coef)."""
    from transformers import TrainingArguments
    from trl import GRPOConfig

    base = training_arguments(config.train, run_dir, has_validation=False)
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    grpo, sampling = config.grpo, config.grpo.sampling
    values.update(
        num_generations=grpo.group_size,
        max_completion_length=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        beta=grpo.kl_coef,
        epsilon=grpo.clip_epsilon,
        num_iterations=grpo.iterations,
        scale_rewards=grpo.scale_rewards,
        reward_weights=[reward.weight for reward in grpo.rewards],
        loss_type="grpo",  # DeepSeekMath's per-completion length average (see the module docstring)
        gradient_checkpointing=config.train.gradient_checkpointing,
        include_num_input_tokens_seen="no",  # GRPO counts prompt and completion tokens itself
        log_completions=False,
        router_aux_loss_coef=aux_loss_coef,
    )
    return GRPOConfig(**values)


class DsftGrpoTrainer(DsftTrainer, GRPOTrainer):
    """GRPOTrainer with DsftTrainer's atomic checkpoints and loss flag, fed dsft's prompt ids.

    GRPOTrainer renders prompts with the tokenizer's chat template and tokenizes the whole string;
    _tokenize_prompts is the one place it does so, and is replaced by a lookup of dsft's ids (rendered and
    encoded segment by segment, exactly as SFT trained and `dsft generate` prompts).
    """

    def __init__(self, *args, prompt_ids: dict[str, list[int]], **kwargs):
        self.prompt_ids = prompt_ids
        """Rendered prompt text -> its token ids."""
        super().__init__(*args, **kwargs)

    def _tokenize_prompts(self, prompts: list):
        return [self.prompt_ids[text] for text in prompts], None, {}

    def create_model_card(self, *args, **kwargs) -> None:
        # TRL writes its card at each checkpoint into args.output_dir, here the checkpoints' staging directory;
        # the run directory's config.yaml and summary.json describe the run.
        return None


class TrlReward:
    """One reward component in the form GRPOTrainer calls: f(prompts, completions, completion_ids, **columns) with
    prompts the rendered prompt texts (the dataset's "prompt" column), looked up to dsft's prompts."""

    def __init__(self, component: RewardComponent, group_size: int, prompts_by_text: dict[str, RlPrompt]):
        self.component = component
        self.group_size = group_size
        self.prompts_by_text = prompts_by_text
        self.__name__ = component.name  # TRL logs each reward function under its __name__

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float | None]:
        batch = Completions(completions, [self.prompts_by_text[text] for text in prompts],
                            [len(ids) for ids in completion_ids], consecutive_groups(prompts, self.group_size))
        return score([self.component], batch).by_name[self.component.name]


class DsftMetricNames(TrainerCallback):
    """Renames TRL's GRPO metrics to dsft's before MetricsCallback writes them: reward_<name> (and _std) per
    component, kl, entropy, clip_fraction, completion_length_tokens, ..."""

    def __init__(self, reward_names: list[str]):
        self.names = dict(TRL_METRIC_NAMES)
        for name in reward_names:
            self.names[f"rewards/{name}/mean"] = f"reward_{name}"
            self.names[f"rewards/{name}/std"] = f"reward_{name}_std"

    def renamed(self, record: dict) -> dict:
        return {self.names.get(key, key): value for key, value in record.items()}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            renamed = self.renamed(logs)
            logs.clear()
            logs.update(renamed)  # in place: the callbacks after this one see the same dict
