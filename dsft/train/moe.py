"""Mixture-of-experts routing while a stage trains (method.moe): the router policy put in place, DeepSeek-V3's
correction bias kept alive, the auxiliary balance losses, the expert-load telemetry and the collapse guard.

setup_moe runs once the stage's trainer exists (TRL's trainers wrap the adapter in their constructor), for every
stage built on the Trainer: it freezes the routers where the policy says so, routes up to moe.profile_samples
training samples through the starting model (the "before" of expert_load.json, and experts: top's choice), and
adds MoeTraining, a Trainer callback:
  - after each optimizer step: the step's loads (real tokens of every micro-batch), summed over the ranks, move
    each router's bias by DeepSeek-V3's rule (the same on every rank, as the sum is);
  - at each training log: the window's load summary into the log record (metrics.jsonl, TensorBoard scalars), a
    TensorBoard histogram per layer, and the collapse guard;
  - at the end: the same samples routed through the trained model ("after"), and expert_load.json / .png.
The bias is a buffer of the model: full fine-tuning saves it in the model and every checkpoint, an adapter in the
gates it saves beside it (modules_to_save), so a resumed run and every loader get it back.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from dsft.errors import DsftError
from dsft.eval.expert_load import expert_load_report, write_expert_load
from dsft.models.moe import (
    ExpertLoads,
    apply_bias_updates,
    find_routers,
    load_stats,
    most_loaded,
    route_sequences,
    row_sequence,
    window_summary,
)
from dsft.models.moe_targets import freeze_routers, keep_only_experts
from dsft.train.distributed import is_main, world_size

EXPERT_TARGETS_FILE = "expert_targets.json"
"""experts: top's choice (layer -> experts), written at the first start and read back on resume."""
PROFILE_BATCH = 8
"""Samples per forward of the profiling passes."""


def setup_moe(trainer, config, run_dir: Path, train_rows, console, tensorboard_writer=None):
    """Put method.moe in place on trainer.model (see the module docstring); returns the MoeTraining callback it
    added, or None for a dense model. Raises DsftError for settings the model cannot honour."""
    moe, method_type = config.method.moe, config.method.type
    model = trainer.model
    routers = find_routers(model)
    if not routers:
        _refuse_on_dense(moe)
        return None
    bias_updates = _bias_updates(moe, method_type, routers)
    _check_aux(moe.aux_loss, routers)
    policy = moe.router_for(method_type)
    if policy == "freeze":
        freeze_routers(model, routers)
    profiled = moe.telemetry or moe.experts == "top"
    sequences = _profile_sequences(train_rows, moe.profile_samples) if profiled else []
    before = route_sequences(model, sequences, PROFILE_BATCH) if sequences else None
    chosen = _choose_experts(moe, model, routers, before, run_dir, config.stage)
    loads = ExpertLoads(model, mode="train", keep_routed=moe.aux_loss.enabled)
    if moe.aux_loss.enabled:
        trainer.moe_aux = (loads, moe.aux_loss)
    # Sharded weights (FSDP, ZeRO-3): the decoder cannot run alone, so the pass after training is left out.
    after = moe.telemetry and before is not None and (world_size() == 1 or config.train.distributed == "ddp")
    callback = MoeTraining(loads, moe, bias_updates, run_dir, console.print, tensorboard_writer,
                           profile=(model, sequences, before, after), facts={"router": policy, "adapted_experts": chosen})
    trainer.moe_training = callback
    handler = trainer.callback_handler
    first_writer = next((i for i, c in enumerate(handler.callbacks) if type(c).__name__ == "MetricsCallback"), 0)
    handler.callbacks.insert(first_writer, callback)  # its additions to a log record reach metrics.jsonl
    console.print(_line(routers, policy, bias_updates, moe), markup=False)
    return callback


def refuse_outside_trainer(config, model, stage: str, report) -> None:
    """For a stage with its own loop (ppo) on an MoE model: the method.moe settings it cannot honour are refused by
    name, and report (a print) says what it leaves out; the router policy and LoRA targets apply as everywhere."""
    if not find_routers(model):
        return
    changed = sorted(config.method.moe.changed() - {"router", "experts", "top_experts", "shared_rank",
                                                     "routed_rank", "router_adapter", "telemetry", "profile_samples"})
    if changed:
        raise DsftError(f"method.moe.{changed[0]}: stage {stage} runs its own loop, without dsft's MoE telemetry, "
                        "bias updates or balance losses; leave it at its default for this stage")
    if config.method.moe.experts == "top":
        raise DsftError(f"method.moe.experts top: stage {stage} has no pass that measures the expert load; choose "
                        "experts all, shared or routed")
    report(f"moe: stage {stage} runs its own loop: router {config.method.moe.router_for(config.method.type)}, "
           "no expert-load telemetry, bias updates or balance losses")


def _line(routers, policy: str, bias_updates: bool, moe) -> str:
    bias = f"bias updates on (gamma {moe.bias_update_speed:g})" if bias_updates else "bias updates off"
    aux = moe.aux_loss
    losses = [f"{name} {getattr(aux, name):g}" for name in ("expert", "device", "communication", "sequence")
              if getattr(aux, name)]
    return (f"moe: {len(routers)} routed layers x {routers[0].num_experts} experts (top-{routers[0].top_k}); "
            f"router {policy}, {bias}, aux losses {', '.join(losses) or 'off'}, experts {moe.experts}")


def _refuse_on_dense(moe) -> None:
    changed = sorted(moe.changed() - {"telemetry", "profile_samples"})
    if changed:
        raise DsftError(f"method.moe.{changed[0]}: the model has no routed experts (a dense model); remove "
                        "method.moe")


def _bias_updates(moe, method_type: str, routers) -> bool:
    has_bias = any(router.has_bias for router in routers)
    if moe.bias_update == "on" and not has_bias:
        raise DsftError("method.moe.bias_update on: this model's routers have no correction bias "
                        "(e_score_correction_bias, DeepSeek-V3 and later); balance V2-style models with "
                        "method.moe.aux_loss")
    return has_bias and moe.bias_updates_for(method_type)


def _check_aux(aux, routers) -> None:
    experts = routers[0].num_experts
    if (aux.device or aux.communication) and experts % aux.devices:
        raise DsftError(f"method.moe.aux_loss.devices: {aux.devices} does not divide the {experts} routed experts")


def _profile_sequences(rows, limit: int) -> list[list[int]]:
    """Up to limit samples' token ids from the training rows (a packed row's samples one by one)."""
    sequences = []
    for row in rows:
        for sample in row if isinstance(row, list) else [row]:
            ids = row_sequence(sample)
            if ids:
                sequences.append(ids)
            if len(sequences) == limit:
                return sequences
    return sequences


def _choose_experts(moe, model, routers, before, run_dir: Path, stage: str) -> dict | None:
    """experts top: the most loaded routed experts per layer (recorded; on resume the record is reused), their
    LoRA columns alone left free to train; None otherwise."""
    if moe.experts != "top":
        return None
    record = run_dir / EXPERT_TARGETS_FILE
    if record.is_file():
        chosen = {int(layer): experts for layer, experts in json.loads(record.read_text(encoding="utf-8")).items()}
    elif before is None:
        raise DsftError(f"method.moe.experts top: stage {stage}'s training rows hold no token ids to measure the "
                        "expert load on; choose experts all, shared or routed")
    else:
        chosen = most_loaded(before, routers, moe.top_experts)
        if is_main():
            record.write_text(json.dumps(chosen, indent=2) + "\n", encoding="utf-8")
    if keep_only_experts(model, chosen) == 0:
        raise DsftError("method.moe.experts top: no LoRA on the routed experts to restrict")
    return chosen


class MoeTraining(TrainerCallback):
    """Bias updates, load windows, the collapse guard and the final expert-load report (see the module docstring)."""

    def __init__(self, loads: ExpertLoads, moe, bias_updates: bool, run_dir: Path, report, tensorboard, profile,
                 facts: dict):
        import torch

        self.loads, self.moe, self.bias_updates = loads, moe, bias_updates
        self.run_dir, self.report, self.tensorboard = Path(run_dir), report, tensorboard
        self.profile, self.facts = profile, facts
        width = max(router.num_experts for router in loads.routers)
        self.window_LE = torch.zeros(len(loads.routers), width, dtype=torch.long)
        self.total_LE = torch.zeros_like(self.window_LE)
        self.aux_sum, self.aux_count = 0.0, 0
        self.collapsed_windows = 0
        self.stopped_at: int | None = None
        """The step at which the collapse guard stopped training (on_collapse stop), else None."""
        self.last_imbalance: float | None = None
        self.nonfinite = None
        """The run's NonFiniteGuard: a step it skipped leaves the bias, and the load windows, as they were."""

    def add_aux(self, value) -> None:
        """One micro-batch's auxiliary loss (a tensor: no device synchronisation), for the window's mean in the log."""
        self.aux_sum, self.aux_count = self.aux_sum + value.detach(), self.aux_count + 1

    def on_step_end(self, args, state, control, **kwargs):
        counts_LE = self.loads.take_counts(_sum_over_ranks)
        if self.nonfinite is not None and self.nonfinite.skipped_step == state.global_step:
            return  # the skipped step changed no weight: its non-finite forward moves no bias either
        self.window_LE += counts_LE
        self.total_LE += counts_LE
        if self.bias_updates:
            apply_bias_updates(self.loads.routers, counts_LE, self.moe.bias_update_speed)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.moe.telemetry or logs is None or "loss" not in logs or int(self.window_LE.sum()) == 0:
            return
        stats = load_stats(self.window_LE, self.loads.routers)
        summary = window_summary(stats)
        logs.update(summary)
        if self.aux_count:
            logs["moe_aux_loss"] = round(float(self.aux_sum) / self.aux_count, 6)
        self.aux_sum, self.aux_count = 0.0, 0
        self._histograms(stats, state.global_step)
        self.window_LE.zero_()
        self._guard(summary["moe_load_imbalance"], state.global_step, control)

    def _histograms(self, stats: list[dict], step: int) -> None:
        if self.tensorboard is None or not is_main():
            return
        import numpy as np

        for layer in stats:
            relative = np.asarray(layer["share"]) * len(layer["share"])
            self.tensorboard.add_histogram(f"moe/layer_{layer['layer']}_load", relative, step)

    def _guard(self, imbalance: float, step: int, control) -> None:
        self.last_imbalance = imbalance
        bound, windows = self.moe.collapse_imbalance, self.moe.collapse_windows
        self.collapsed_windows = self.collapsed_windows + 1 if imbalance > bound else 0
        if self.collapsed_windows < windows or self.collapsed_windows % windows:
            return
        what = (f"step {step}: routing collapsing: the most loaded expert takes {imbalance:.2f}x its balanced share "
                f"(method.moe.collapse_imbalance {bound:g}) for {self.collapsed_windows} logging windows in a row")
        if self.moe.on_collapse == "stop":
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = step
        self.report(f"warning: {what}" + ("; stopping with a checkpoint" if self.stopped_at else ""))

    def on_train_end(self, args, state, control, **kwargs):
        model, sequences, before, profile_after = self.profile
        phases, tokens = {}, {}
        if before is not None:
            phases["before"], tokens["before"] = before, sum(map(len, sequences))
        if profile_after:
            phases["after"], tokens["after"] = route_sequences(model, sequences, PROFILE_BATCH), tokens["before"]
        phases["training"] = self.total_LE
        if is_main() and self.moe.telemetry:
            report = expert_load_report(self.loads.routers, phases, tokens, **self.facts,
                                        profile_samples=len(sequences), bias_updates=self.bias_updates)
            write_expert_load(self.run_dir, report)

    def summary(self) -> dict:
        """What summary.json says of the routing."""
        total = window_summary(load_stats(self.total_LE, self.loads.routers))
        return {**self.facts, "bias_updates": self.bias_updates, "collapse_stop_step": self.stopped_at,
                "last_window_imbalance": self.last_imbalance, "training": total}


def _sum_over_ranks(counts_LE) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts_LE, op=dist.ReduceOp.SUM)


def collapse_error(callback: MoeTraining | None, checkpoint: Path | None) -> DsftError | None:
    """The error a stage raises when the collapse guard stopped training, naming the checkpoint kept."""
    if callback is None or callback.stopped_at is None:
        return None
    return DsftError(f"training stopped at step {callback.stopped_at}: the routing collapsed (expert load "
                     f"imbalance {callback.last_imbalance:.2f} above method.moe.collapse_imbalance "
                     f"{callback.moe.collapse_imbalance:g}); checkpoint kept in {checkpoint}. Change method.moe "
                     "(router freeze, bias_update on, aux_loss) or lower train.learning_rate, then resume with --resume")
