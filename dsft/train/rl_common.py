"""What the RL stages (grpo, ppo) share: settings they refuse, the held-out exact match around training, and
the reward numbers of the summary."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from dsft.config import RunConfig
from dsft.data.columns import FieldMap
from dsft.data.dataset import DataStats, load_examples
from dsft.errors import DsftError
from dsft.eval.exact_match import ExactMatchResult, score_exact_match
from dsft.models.generate import DecodeSettings
from dsft.train.loop import TENSORBOARD_DIR, format_number


def load_prompts(config: RunConfig, run_dir: Path):
    """(config with the resolved chat template, tokenizer, prompts, stats): the tokenizer (trained
    on the prompts for a preset), the template generation uses, and the prompts rendered with it. Saves the
    resolved config into run_dir."""
    from dsft.data.chat import resolve_template
    from dsft.data.prompts import load_rl_prompts, prompt_texts
    from dsft.train import run_dir as rd

    tokenizer = rd.run_tokenizer(config.model, run_dir, lambda: prompt_texts(config.data))
    template = resolve_template(config.data.chat_template, tokenizer)
    config = config.model_copy(update={"data": config.data.model_copy(update={"chat_template": template})})
    rd.save_config(config, run_dir)
    stats = DataStats()
    prompts = load_rl_prompts(config.data, tokenizer, template, stats)
    return config, tokenizer, prompts, stats


def refuse_settings(config: RunConfig, stage: str, more: dict[str, bool] | None = None) -> None:
    """Raise DsftError naming the first set key that stage would silently ignore (more: further key -> is set)."""
    train = config.train
    ignored = {"train.pack_tokens": train.pack_tokens is not None, "train.auto_find_batch_size": train.auto_find_batch_size,
               "train.early_stopping_patience": train.early_stopping_patience is not None,
               "train.adversarial": train.adversarial.method != "none", "method.unfreeze": bool(config.method.unfreeze),
               **(more or {})}
    for key, is_set in ignored.items():
        if is_set:
            raise DsftError(f"{key} does not apply to stage {stage}; remove it")


def held_out_examples(config: RunConfig, console: Console) -> list:
    """The examples of eval.generate_files (at most eval.max_samples), for exact match before and after."""
    if not config.eval.generate_files:
        return []
    stats = DataStats()
    examples = load_examples(config.eval.generate_files, config.data.format, config.data.on_error, stats,
                             config.data.system_prompt, fields=FieldMap.of(config.data))
    if stats.skipped_bad:
        console.print(f"eval data: skipped {stats.skipped_bad} bad records")
    return examples[: config.eval.max_samples] if config.eval.max_samples else examples


def held_out_exact_match(model, tokenizer, examples, config: RunConfig, console: Console, when: str
                         ) -> ExactMatchResult | None:
    """Greedy exact match on the held-out examples, as the SFT stage measures it; None without examples (and
    before training when eval.before_training is off)."""
    if not examples or (when == "before training" and not config.eval.before_training):
        return None
    settings = DecodeSettings(max_new_tokens=config.eval.max_new_tokens)
    result = score_exact_match(model, tokenizer, examples, config.data.chat_template, settings,
                               config.eval.batch_size, config.data.thinking_mode)
    console.print(f"exact match {when}: {result.accuracy:.3f} on {result.count} held-out prompts")
    return result


def exact_match_summary(before: ExactMatchResult | None, after: ExactMatchResult | None) -> dict:
    return {"exact_match_before": before.accuracy if before else None,
            "exact_match_after": after.accuracy if after else None,
            "exact_match_samples": after.samples if after else []}


def reward_summary(records: list[dict], reward_names: list[str]) -> dict:
    """Mean reward (and each component, reward_<name>) over the first and over the last fifth of the records
    (GRPO: its logged steps; PPO: every step), plus the history of (step, reward)."""
    logged = [record for record in records if record.get("reward") is not None]
    summary: dict = {"reward_history": [[record["step"], record["reward"]] for record in logged]}
    span = max(1, len(logged) // 5)
    for key in ["reward", *(f"reward_{name}" for name in reward_names)]:
        values = [record[key] for record in logged if record.get(key) is not None]
        summary[f"{key}_first"] = sum(values[:span]) / len(values[:span]) if values else None
        summary[f"{key}_last"] = sum(values[-span:]) / len(values[-span:]) if values else None
    return summary


def tensorboard_writer(run_dir: Path):
    """A TensorBoard writer into run_dir/tensorboard, where every stage writes its event files."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))


def print_summary(console: Console, summary: dict, run_dir: Path) -> None:
    table = Table(title=f"dsft run {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("steps", "reward_first", "reward_last", "wall_time_s", "exact_match_before", "exact_match_after"):
        if summary.get(key) is not None:
            table.add_row(key, format_number(summary[key]))
    console.print(table)
