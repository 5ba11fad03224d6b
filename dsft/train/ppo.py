"""PPO, top to bottom: config -> tokenizer -> prompts -> rewards -> policy + value head -> rollouts and updates
-> run directory.

Each step: sample one completion for each of ppo.rollout_batch_size prompts (rollout); score every completion
with the reward components; give every token the reward -kl_coef * (log pi - log pi_ref), plus the
completion's score at its last token; estimate advantages with GAE (gamma, lam) from the value head's
estimates; then ppo.ppo_epochs passes of minibatch updates of the clipped policy loss, the clipped value loss
(x value_loss_coef) and an entropy bonus (x entropy_coef); then log.

TRL no longer ships PPO, so this is dsft's own small loop: the policy is the run's model (full, LoRA or freeze),
the value head a linear layer on its last hidden state (dsft/models/value_head.py), the reference the model
with its LoRA adapter disabled or, for full and freeze, a frozen copy of the starting weights. Prompts are
rendered exactly as SFT and `dsft generate` render them. The math lives in rl_math.py, the rewards in
rewards.py; this file holds the order of things. Every logged step is one line of metrics.jsonl (and TensorBoard
scalars). With train.save_steps, every save_steps-th step writes checkpoints/checkpoint-N (ppo_checkpoints.py),
and --resume continues from the newest sound one on the same trajectory (weights, optimizer, sampler and RNG).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dsft.config import RunConfig
from dsft.data.dataset import DataStats
from dsft.data.prompts import RlPrompt
from dsft.errors import TrainingDiverged, TrainingInterrupted
from dsft.eval.speed import process_peak_memory
from dsft.models.generate import pad_left
from dsft.models.load import resolve_dtype
from dsft.models.method import apply_method, count_parameters
from dsft.models.packed_forward import is_packed
from dsft.models.value_head import ValueHead, model_hidden_size, save_value_head
from dsft.train import rl_math
from dsft.train import run_dir as rd
from dsft.train.adapters import initialise_adapter
from dsft.train.callbacks import MetricsCallback
from dsft.train.guards import StopOnSignal
from dsft.train.loop import checkpoint_to_resume, data_fingerprints, pack_batches, save_model, track
from dsft.train.moe import refuse_outside_trainer
from dsft.train.ppo_checkpoints import load_ppo_checkpoint, save_ppo_checkpoint
from dsft.train.rewards import Completions, RewardComponent, Rewards, build_rewards, score
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
from dsft.train.tracking import ended_on_error


@dataclasses.dataclass
class PpoResult:
    run_dir: Path
    summary: dict
    model: object
    """The trained policy in memory (a PeftModel for LoRA)."""
    value_head: ValueHead
    tokenizer: object


@dataclasses.dataclass
class Rollout:
    """One batch of sampled completions with everything the updates need; B rows, T completion tokens."""

    input_ids_BL: torch.Tensor
    """Left-padded prompt, then the completion (right-padded); L = prompt width + T."""
    attention_mask_BL: torch.Tensor
    completion_mask_BT: torch.Tensor
    """1 on completion tokens up to and including the first end-of-sequence token."""
    logprobs_BT: torch.Tensor
    """Log-probabilities of the sampled tokens under the policy that sampled them."""
    values_BT: torch.Tensor
    advantages_BT: torch.Tensor
    returns_BT: torch.Tensor
    kl_BT: torch.Tensor
    """Per-token log pi - log pi_ref (masked)."""
    rewards: Rewards
    texts: list[str]


def run_ppo(
    config: RunConfig, resume: bool = False, console: Console | None = None, resume_command: str = "dsft train CONFIG --resume"
) -> PpoResult:
    """Train the policy with PPO as the config says and write the run directory.

    Raises DsftError for bad input and for --resume without a sound checkpoint, TrainingDiverged on a
    non-finite loss (before the update is applied).
    """
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    console = console or Console(soft_wrap=True)
    hf_logging.disable_progress_bar()
    started_s = time.perf_counter()
    refuse_settings(config, "ppo", {"train.eval_steps": config.train.eval_steps is not None,
                                    # dsft's own PPO loop builds its AdamW itself, with one learning rate
                                    "method.lora.plus_lr_ratio": config.method.lora.plus_lr_ratio is not None})
    run_dir = rd.prepare_run_dir(config.output, resume=resume)
    console.print(f"run directory: {run_dir}")
    checkpoint = checkpoint_to_resume(run_dir, console) if resume else None  # also cuts metrics.jsonl back

    # Setup: tokenizer, the template generation uses, then prompts rendered with it and the reward components.
    set_seed(config.train.seed)
    config, tokenizer, prompts, stats = load_prompts(config, run_dir)
    ppo = config.ppo
    components = build_rewards(ppo.rewards, "ppo.rewards", ppo.sampling.max_new_tokens)
    console.print(f"data: {len(prompts):,} prompts; reward: " + " + ".join(f"{c.weight:g} x {c.name}" for c in components))
    eval_examples = held_out_examples(config, console)

    # Policy, value head and reference (what the policy starts as).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = rd.start_model(config, tokenizer, run_dir, console)
    reference = None if config.method.adapter else _frozen_copy(model).to(device)
    policy = apply_method(model, config.method).to(device)
    refuse_outside_trainer(config, policy, "ppo", console.print)
    initialise_adapter(policy, config, run_dir)
    _disable_dropout(policy)  # the first update's ratio to the rollout policy is then exactly 1
    if config.train.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        policy.enable_input_require_grads()
    if config.train.packing:  # the log-prob and value passes run packed; generation does not
        pack_batches(policy, config, console, "each batch of prompts and completions",
                     *([reference] if reference is not None else []))
    value_head = ValueHead(model_hidden_size(policy)).to(device)
    counts = count_parameters(policy)
    console.print(f"method {config.method.type}: {counts.line()}; value head: {model_hidden_size(policy) + 1:,} parameters")
    steps = _total_steps(config, len(prompts))
    optimizer, scheduler = _optimizer(config, policy, value_head, steps)
    before = held_out_exact_match(policy, tokenizer, eval_examples, config, console, "before training")

    # Train: rollout -> rewards -> GAE -> ppo_epochs of minibatch updates -> log.
    metrics = MetricsCallback(run_dir, track(config, run_dir, console))
    with ended_on_error(metrics.tracker):
        records = _train(config, run_dir, policy, reference, value_head, optimizer, scheduler, tokenizer, prompts,
                         components, steps, metrics.write, console, checkpoint, resume_command)

    # Save: adapter or full model (as every stage saves it), the value head, tokenizer, then the numbers.
    save_model(SimpleNamespace(model=policy), tokenizer, run_dir, config)  # save_model needs only the trainer's model
    save_value_head(value_head, run_dir)
    after = held_out_exact_match(policy, tokenizer, eval_examples, config, console, "after training")
    summary = _summary(config, records, stats, counts, started_s, components)
    summary.update(exact_match_summary(before, after), data_fingerprints=data_fingerprints(config.data))
    rd.write_summary(run_dir, summary, metrics.tracker)
    print_summary(console, summary, run_dir)
    return PpoResult(run_dir, summary, policy, value_head, tokenizer)


def _train(config, run_dir, policy, reference, value_head, optimizer, scheduler, tokenizer, prompts, components,
           steps, write, console, checkpoint: Path | None = None, resume_command: str = "") -> list[dict]:
    """The PPO steps after the checkpoint's (all of them without one); returns the records of every step
    (also written to metrics.jsonl through write) and writes a checkpoint every train.save_steps steps.

    SIGTERM / SIGINT finish the current step, save a checkpoint and raise TrainingInterrupted (with the
    resume command); a second signal aborts at once."""
    sampler = _PromptSampler(prompts, config.ppo.rollout_batch_size, config.train.seed)
    done_steps, records = 0, []
    if checkpoint is not None:  # restored last, after setup, so RNG is exactly where the first run left it
        done_steps, records = load_ppo_checkpoint(checkpoint, policy, value_head, optimizer, scheduler, sampler)
    save_steps = config.train.save_steps
    progress = Progress(TextColumn("[bold]ppo"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    writer = tensorboard_writer(run_dir) if config.train.tensorboard else None
    stop = StopOnSignal()
    stop.on_train_begin(None, None, None)  # the Trainer callback's handlers, used here without a Trainer
    try:
        with progress:
            task = progress.add_task("ppo", total=steps, completed=done_steps, status="")
            for step in range(done_steps + 1, steps + 1):
                step_started_s = time.perf_counter()
                batch = sampler.next_batch()
                rollout = collect_rollout(policy, reference, value_head, tokenizer, batch, components, config)
                update = ppo_update(policy, value_head, optimizer, scheduler, rollout, config, step)
                step_time_s = time.perf_counter() - step_started_s
                record = _record(step, rollout, update, scheduler.get_last_lr()[0], step_time_s)
                records.append(record)
                if step % config.train.logging_steps == 0 or step == steps:
                    write(record)
                    _add_scalars(writer, record)
                signalled = stop.signal_name is not None
                if signalled or (save_steps is not None and step % save_steps == 0):
                    saved = save_ppo_checkpoint(run_dir, step, policy, value_head, optimizer, scheduler, sampler,
                                                records, config.train.keep_last_checkpoints)
                if signalled:
                    raise TrainingInterrupted(f"stopped by {stop.signal_name} at step {step}; checkpoint saved in "
                                              f"{saved}. Resume with: {resume_command}")
                progress.update(task, completed=step, status=f"reward {record['reward']:.3f}  kl {record['kl']:.4f}  "
                                                             f"value loss {record['value_loss']:.4f}")
    finally:
        stop.restore()
        if writer is not None:
            writer.close()
    return records


def _add_scalars(writer, record: dict) -> None:
    for key, value in record.items():
        if writer is not None and key != "step" and isinstance(value, float):
            writer.add_scalar(f"train/{key}", value, record["step"])


# --- rollout ----------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_rollout(policy, reference, value_head, tokenizer, prompts: list[RlPrompt], components, config) -> Rollout:
    """Sample one completion per prompt, score it, and compute log-probabilities, values, KL, advantages and returns."""
    ppo, sampling = config.ppo, config.ppo.sampling
    device = next(policy.parameters()).device
    prompt_ids_BP, prompt_mask_BP = (t.to(device) for t in pad_left([list(p.ids) for p in prompts], tokenizer.pad_token_id))
    policy.eval()
    generated_BL = policy.generate(input_ids=prompt_ids_BP, attention_mask=prompt_mask_BP, do_sample=True,
                                   max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                   top_p=sampling.top_p, top_k=0, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
    policy.train()
    completion_BT = generated_BL[:, prompt_ids_BP.shape[1]:]
    completion_mask_BT = completion_mask(completion_BT, tokenizer.eos_token_id)
    completion_BT = completion_BT.masked_fill(completion_mask_BT == 0, tokenizer.pad_token_id)
    input_ids_BL = torch.cat([prompt_ids_BP, completion_BT], dim=1)
    attention_mask_BL = torch.cat([prompt_mask_BP, completion_mask_BT], dim=1)
    logits_BTV, values_BT = forward(policy, value_head, input_ids_BL, attention_mask_BL, completion_BT.shape[1],
                                    sampling.temperature)
    logprobs_BT, _ = rl_math.logprobs_and_entropy(logits_BTV, completion_BT)
    ref_logprobs_BT = _reference_logprobs(policy, reference, input_ids_BL, attention_mask_BL, completion_BT, sampling.temperature)

    texts = tokenizer.batch_decode(completion_BT, skip_special_tokens=True)
    lengths = completion_mask_BT.sum(1).tolist()
    # The rollout batch is one group: diversity counts what a completion shares with the others of the batch.
    batch = Completions(texts, prompts, lengths, [0] * len(prompts))
    rewards = score(components, batch)
    scores_B = torch.tensor(rewards.totals, dtype=torch.float32, device=device)
    mask_BT = completion_mask_BT.float()
    token_rewards_BT, kl_BT = rl_math.token_rewards(scores_B, logprobs_BT, ref_logprobs_BT, mask_BT, ppo.kl_coef)
    advantages_BT, returns_BT = rl_math.gae(token_rewards_BT, values_BT * mask_BT, mask_BT, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        advantages_BT = rl_math.masked_whiten(advantages_BT, mask_BT)
    return Rollout(input_ids_BL, attention_mask_BL, mask_BT, logprobs_BT, values_BT * mask_BT, advantages_BT,
                   returns_BT, kl_BT, rewards, texts)


def completion_mask(completion_BT, eos_token_id: int):
    """1 on each completion's tokens up to and including its first end-of-sequence token, 0 after it."""
    is_eos_BT = completion_BT == eos_token_id
    width = completion_BT.shape[1]
    first_eos_B = torch.where(is_eos_BT.any(1), is_eos_BT.int().argmax(1), torch.full_like(is_eos_BT[:, 0], width, dtype=torch.long))
    positions_BT = torch.arange(width, device=completion_BT.device).expand_as(completion_BT)
    return (positions_BT <= first_eos_B[:, None]).long()


def forward(model, value_head, input_ids_BL, attention_mask_BL, completion_width: int, temperature: float):
    """(next-token logits / temperature, values) at the T positions that predict the completion tokens.

    Position ids follow the attention mask, as generate() numbers a left-padded prompt, so the log-probabilities
    are those of the distribution the tokens were sampled from; a packed body (train.packing) numbers the real
    tokens of each row so itself. value_head None gives values None. The LM head runs on the completion window
    only (logits_to_keep): the prompt's positions get no vocabulary-sized logits.
    """
    position_ids_BL = None if is_packed(model) else (attention_mask_BL.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids_BL, attention_mask=attention_mask_BL, position_ids=position_ids_BL,
                output_hidden_states=value_head is not None, logits_to_keep=completion_width + 1)
    window = slice(-completion_width - 1, -1)
    logits_BTV = out.logits[:, window].float() / temperature
    values_BT = value_head(out.hidden_states[-1][:, window]) if value_head is not None else None
    return logits_BTV, values_BT


def _reference_logprobs(policy, reference, input_ids_BL, attention_mask_BL, completion_BT, temperature: float):
    """Log-probabilities of the completion under the reference: the frozen copy, or the policy without its adapter."""
    width = completion_BT.shape[1]
    if reference is not None:
        logits_BTV, _ = forward(reference, None, input_ids_BL, attention_mask_BL, width, temperature)
    else:
        with policy.disable_adapter():
            logits_BTV, _ = forward(policy, None, input_ids_BL, attention_mask_BL, width, temperature)
    return rl_math.logprobs_and_entropy(logits_BTV, completion_BT)[0]


# --- update -----------------------------------------------------------------------------------------------


def ppo_update(policy, value_head, optimizer, scheduler, rollout: Rollout, config: RunConfig, step: int) -> dict:
    """ppo.ppo_epochs passes over the rollout in shuffled minibatches of train.batch_size x train.grad_accum_steps
    rows (one optimizer step each); returns the means of the losses and diagnostics over all minibatches.

    Raises TrainingDiverged on a non-finite loss, before that minibatch's update is applied.
    """
    train, ppo = config.train, config.ppo
    rows = rollout.input_ids_BL.shape[0]
    minibatch_rows = train.batch_size * train.grad_accum_steps
    generator = torch.Generator().manual_seed(train.seed * 100_003 + step)
    trainable = [p for p in [*policy.parameters(), *value_head.parameters()] if p.requires_grad]
    totals: dict[str, float] = {}
    updates = 0
    for _ in range(ppo.ppo_epochs):
        order = torch.randperm(rows, generator=generator).tolist()
        for start in range(0, rows, minibatch_rows):
            minibatch = order[start:start + minibatch_rows]
            for key, value in _minibatch_step(policy, value_head, rollout, minibatch, config).items():
                totals[key] = totals.get(key, 0.0) + value
            totals["grad_norm"] = totals.get("grad_norm", 0.0) + _clip(trainable, train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
    return {key: value / updates for key, value in totals.items()}


def _minibatch_step(policy, value_head, rollout: Rollout, minibatch: list[int], config: RunConfig) -> dict:
    """Forward and backward of one minibatch in micro-batches of train.batch_size rows (gradients accumulate).

    Each micro-batch's token means are weighted by its share of the minibatch's completion tokens, so the sum
    is the minibatch's token mean: accumulating 2 x 8 rows gives the gradient of 16 rows at once.
    """
    train = config.train
    sums: dict[str, float] = {}
    minibatch_tokens = rollout.completion_mask_BT[minibatch].sum()
    for start in range(0, len(minibatch), train.batch_size):
        rows = minibatch[start:start + train.batch_size]
        share = (rollout.completion_mask_BT[rows].sum() / minibatch_tokens).item()
        losses = ppo_losses(policy, value_head, rollout, rows, config)
        if not bool(torch.isfinite(losses["loss"])):
            raise TrainingDiverged("non-finite PPO loss; the update was not applied. Lower train.learning_rate, keep "
                                   "train.max_grad_norm > 0, or lower ppo.kl_coef and the reward scale")
        (losses["loss"] * share).backward()
        for key, value in losses.items():
            value = value.item() if isinstance(value, torch.Tensor) else value
            sums[key] = sums.get(key, 0.0) + value * share
    return sums


def ppo_losses(policy, value_head, rollout: Rollout, rows: list[int], config: RunConfig) -> dict:
    """The PPO loss of some rows of the rollout and its parts: clipped policy loss + value_loss_coef x clipped
    value loss - entropy_coef x entropy."""
    ppo = config.ppo
    mask_BT = rollout.completion_mask_BT[rows]
    width = mask_BT.shape[1]
    logits_BTV, values_BT = forward(policy, value_head, rollout.input_ids_BL[rows], rollout.attention_mask_BL[rows],
                                    width, ppo.sampling.temperature)
    tokens_BT = rollout.input_ids_BL[rows][:, -width:]
    logprobs_BT, entropy_BT = rl_math.logprobs_and_entropy(logits_BTV, tokens_BT)
    policy_loss = rl_math.clipped_policy_loss(logprobs_BT, rollout.logprobs_BT[rows], rollout.advantages_BT[rows],
                                              mask_BT, ppo.clip_range)
    value_loss = rl_math.clipped_value_loss(values_BT, rollout.values_BT[rows], rollout.returns_BT[rows], mask_BT,
                                            ppo.value_clip_range)
    entropy = rl_math.masked_mean(entropy_BT, mask_BT)
    loss = policy_loss.loss + ppo.value_loss_coef * value_loss.loss - ppo.entropy_coef * entropy
    return {"loss": loss, "policy_loss": policy_loss.loss.detach(), "value_loss": value_loss.loss.detach(),
            "entropy": entropy.detach(), "clip_fraction": policy_loss.clip_fraction,
            "value_clip_fraction": value_loss.clip_fraction, "approx_kl": policy_loss.approx_kl}


def _clip(parameters, max_grad_norm: float) -> float:
    """Clip the gradients' global norm (0: no clipping); returns the norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    if max_grad_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm))
    return float(torch.nn.utils.get_total_norm(grads))


# --- setup and bookkeeping --------------------------------------------------------------------------------


class _PromptSampler:
    """Prompts in a seeded shuffled order, epoch after epoch, rollout_batch_size at a time."""

    def __init__(self, prompts: list[RlPrompt], batch_size: int, seed: int):
        self.prompts, self.batch_size = prompts, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next_batch(self) -> list[RlPrompt]:
        batch = []
        while len(batch) < self.batch_size:
            if not self.order:
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            batch.append(self.prompts[self.order.pop(0)])
        return batch


def _total_steps(config: RunConfig, prompt_count: int) -> int:
    """train.max_steps, else the steps that take train.epochs passes over the prompts."""
    if config.train.max_steps is not None:
        return config.train.max_steps
    return max(1, math.ceil(config.train.epochs * prompt_count / config.ppo.rollout_batch_size))


def _optimizer(config: RunConfig, policy, value_head, steps: int):
    """AdamW over the trainable policy weights and the value head, with the configured schedule over all
    optimizer steps (steps x ppo_epochs x minibatches per rollout)."""
    from transformers import get_scheduler

    train = config.train
    parameters = [p for p in [*policy.parameters(), *value_head.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                                  weight_decay=train.weight_decay)
    minibatches = math.ceil(config.ppo.rollout_batch_size / (train.batch_size * train.grad_accum_steps))
    updates = steps * config.ppo.ppo_epochs * minibatches
    warmup = train.lr_warmup_steps or int(train.lr_warmup_ratio * updates)
    return optimizer, get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=updates)


def _frozen_copy(model):
    """The reference for full and freeze training: a copy of the starting weights that never trains."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


def _disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _record(step: int, rollout: Rollout, update: dict, learning_rate: float, step_time_s: float) -> dict:
    """One line of metrics.jsonl: reward (mean, spread, each component), KL, entropy, clip fractions, losses."""
    mask_BT = rollout.completion_mask_BT
    totals = torch.tensor(rollout.rewards.totals)
    record = {"step": step, "loss": update["loss"], "policy_loss": update["policy_loss"],
              "value_loss": update["value_loss"], "reward": totals.mean().item(), "reward_std": totals.std().item()}
    for name, values in rollout.rewards.by_name.items():
        present = torch.tensor([v for v in values if v is not None], dtype=torch.float32)
        record[f"reward_{name}"] = present.mean().item() if present.numel() else None
        record[f"reward_{name}_std"] = present.std().item() if present.numel() > 1 else None
    record.update(kl=rl_math.masked_mean(rollout.kl_BT, mask_BT).item(), entropy=update["entropy"],
                  clip_fraction=update["clip_fraction"], value_clip_fraction=update["value_clip_fraction"],
                  approx_kl=update["approx_kl"], grad_norm=update["grad_norm"], learning_rate=learning_rate,
                  value_mean=rl_math.masked_mean(rollout.values_BT, mask_BT).item(),
                  return_mean=rl_math.masked_mean(rollout.returns_BT, mask_BT).item(),
                  completion_length_tokens=mask_BT.sum(1).float().mean().item(), step_time_s=round(step_time_s, 3))
    return record


def _summary(config: RunConfig, records: list[dict], stats: DataStats, counts, started_s: float,
             components: list[RewardComponent]) -> dict:
    summary = {"stage": "ppo", "method": config.method.type, "steps": len(records),
               "final_value_loss": records[-1]["value_loss"] if records else None,
               "first_value_loss": records[0]["value_loss"] if records else None,
               "wall_time_s": round(time.perf_counter() - started_s, 2), "peak_memory": process_peak_memory(),
               "trainable_parameters": counts.trainable, "total_parameters": counts.total,
               "packing": config.train.packing, "dtype": str(resolve_dtype(config.model.dtype)).removeprefix("torch."),
               "data": dataclasses.asdict(stats)}
    summary.update(reward_summary(records, [c.name for c in components]))
    return summary
