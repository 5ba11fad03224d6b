"""Multi-stage runs, top to bottom: stage after stage, each starting from the previous stage's weights.

A config with `stages` trains each stage as its own run directory under output.dir/stages/N-name
(the stage's task decides which training function runs). The first stage starts from the
config's model; every later one from the weights the stage before produced: the stage directory
itself after full or freeze training, or, after LoRA, the adapter merged into its base and saved
in the stage's merged/ directory (the next stage trains a fresh adapter on top). The tokenizer
travels with the weights. output.dir/summary.json lists every stage's result.

--resume skips the stages that finished (their summary.json exists), resumes the first
unfinished one from its newest checkpoint when it has one, and starts it afresh otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dsft.config import ModelConfig, OutputConfig, RunConfig
from dsft.config.tracking import TrackingConfig
from dsft.train import run_dir as rd
from dsft.train.checkpoints import list_checkpoints

STAGES_DIR = "stages"
MERGED_DIR = "merged"


def run_stages(config: RunConfig, stage_function: Callable[[str], Callable], resume: bool = False,
               console: Console | None = None, resume_command: str = "dsft train CONFIG --resume") -> dict:
    """Train every stage of config in order and write output.dir/summary.json; returns that summary.

    stage_function(config) gives the training function of a stage's config (as `dsft train` dispatches).
    Raises what the stages raise (DsftError, TrainingInterrupted, TrainingDiverged); a stage that
    stops leaves the finished ones in place for --resume.
    """
    console = console or Console(soft_wrap=True)
    root = _prepare_root(config, resume)
    rd.save_config(config, root)
    names = [stage["name"] for stage in config.stages]
    start_model, results = config.model, []
    for number, (name, stage_config) in enumerate(zip(names, config.stage_configs), start=1):
        stage_dir = root / STAGES_DIR / f"{number}-{name}"
        stage_config = stage_config.model_copy(update={
            "model": start_model,
            "output": OutputConfig(dir=str(stage_dir), overwrite=config.output.overwrite),
            "tracking": _stage_tracking(stage_config.tracking, root, name),
        })
        console.rule(f"stage {number}/{len(names)}: {name} ({stage_config.task}, method {stage_config.method.type})")
        if not _finished(stage_dir):
            stage_resume = resume and bool(list_checkpoints(stage_dir / rd.CHECKPOINTS_DIR))
            stage_function(stage_config)(stage_config, resume=stage_resume, console=console,
                                              resume_command=resume_command)
        summary = json.loads((stage_dir / rd.SUMMARY_FILE).read_text(encoding="utf-8"))
        results.append({"name": name, "task": stage_config.task, "dir": str(stage_dir),
                        "started_from": _describe_model(start_model), "summary": summary})
        start_model = _next_start(stage_dir, stage_config, console)
    summary = {"stages": results, "final_model": _describe_model(start_model)}
    rd.write_summary(root, summary)
    _print_stages(console, results)
    return summary


def _stage_tracking(tracking: TrackingConfig, root: Path, name: str) -> TrackingConfig:
    """A stage's tracking: its MLflow run in the store the whole run's output.dir resolves to (not one beside each
    stage directory), named after the run and the stage."""
    settings = tracking.mlflow
    if not settings.enabled:
        return tracking
    return TrackingConfig(mlflow=settings.model_copy(update={
        "tracking_uri": settings.store_uri(root), "run_name": f"{settings.run_name or root.name}: {name}"}))


def _prepare_root(config: RunConfig, resume: bool) -> Path:
    """The run's top directory: created fresh, or, for --resume, the existing one."""
    root = Path(config.output.dir)
    if resume and (root / STAGES_DIR).is_dir():
        return root
    return rd.prepare_run_dir(config.output, resume=False)


def _finished(stage_dir: Path) -> bool:
    return (stage_dir / rd.SUMMARY_FILE).is_file()


def _next_start(stage_dir: Path, stage_config: RunConfig, console: Console) -> ModelConfig:
    """The model the next stage starts from: this stage's weights, as a local directory."""
    weights_dir = stage_dir
    if stage_config.method.adapter:
        weights_dir = _merged_weights(stage_dir, console)
    previous = stage_config.model
    return ModelConfig(name_or_path=str(weights_dir.resolve()), dtype=previous.dtype,
                       attn_implementation=previous.attn_implementation,
                       tokenizer_vocab_size=previous.tokenizer_vocab_size)


def _merged_weights(stage_dir: Path, console: Console) -> Path:
    """The stage's adapter merged into its base, saved (safetensors, with the tokenizer) in stage_dir/merged.

    dsft export's streaming merge: tensor by tensor in the base's dtype, so no second copy of the model is held.
    """
    from dsft.export.export import write_export

    merged_dir = stage_dir / MERGED_DIR
    if (merged_dir / "config.json").is_file():
        return merged_dir
    write_export(stage_dir, merged_dir, merge=True)  # renamed into place: the next stage never sees half of it
    console.print(f"merged the adapter into its base: {merged_dir}")
    return merged_dir


def _describe_model(model: ModelConfig) -> str:
    return model.name_or_path if model.name_or_path is not None else f"preset {model.preset}"


def _print_stages(console: Console, results: list[dict]) -> None:
    table = Table(title="dsft stages")
    for column in ("stage", "task", "steps", "final train loss", "final eval loss", "accuracy"):
        table.add_column(column)
    for result in results:
        summary = result["summary"]
        numbers = [summary.get(key) for key in ("steps", "final_train_loss", "final_eval_loss", "accuracy")]
        table.add_row(result["name"], result["task"], *("" if n is None else f"{n:.4g}" for n in numbers))
    console.print(table)
