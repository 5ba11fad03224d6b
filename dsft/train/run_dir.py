"""The run directory every stage writes: layout, resolved config, checkpoints and summary."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from dsft.config import ModelConfig, OutputConfig, RunConfig, dump_config
from dsft.errors import DsftError
from dsft.models.load import BASE_MODEL_DIR, build_tokenizer
from dsft.train.checkpoints import list_checkpoints
from dsft.train.distributed import is_main, main_first

CHECKPOINTS_DIR = "checkpoints"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"


def prepare_run_dir(output: OutputConfig, resume: bool) -> Path:
    """Create (or, for --resume, check) the run directory; never silently overwrites a run.

    With several ranks, rank 0 checks and prepares it while the others wait; they do not check it again, since
    by the time they run rank 0 may already be writing into it (a second rank once refused the directory as
    "already holds a run" when rank 0 had written its first file)."""
    with main_first():
        if is_main():
            return _prepare_run_dir(output, resume)
    return Path(output.dir)


def _prepare_run_dir(output: OutputConfig, resume: bool) -> Path:
    run_dir = Path(output.dir)
    if resume:
        if not list_checkpoints(run_dir / CHECKPOINTS_DIR):
            raise DsftError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS_DIR}; set train.save_steps to write them")
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise DsftError(f"output.dir {run_dir} is a file; choose a directory")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not output.overwrite:
            raise DsftError(
                f"output.dir {run_dir} already holds a run; continue it with --resume, "
                "replace it with output.overwrite: true, or choose another output.dir"
            )
        _check_replaceable(run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _check_replaceable(run_dir: Path) -> None:
    """output.overwrite deletes a run, never anything else: not the working directory (or one holding it), where
    the config and data may live, and not a directory without a run's config.yaml."""
    resolved, cwd = run_dir.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise DsftError(f"output.dir {run_dir} holds the working directory; output.overwrite would delete it, so "
                        "choose a directory of its own for the run")
    if not (run_dir / CONFIG_FILE).is_file():
        raise DsftError(f"output.dir {run_dir} holds files but no {CONFIG_FILE}, so it is not a dsft run; "
                        "output.overwrite only replaces runs: choose another output.dir")


def run_tokenizer(model: ModelConfig, run_dir: Path, training_texts: Callable[[], Iterable[str]]):
    """build_tokenizer with rank 0 first: it trains and saves a preset's tokenizer, and the other ranks load that one
    instead of writing the same files at the same time."""
    with main_first():
        return build_tokenizer(model, run_dir, training_texts)


def save_base(model, run_dir: Path) -> Path:
    """Write a preset's starting weights to the run's base_model/ and return that path.

    A preset exists nowhere else, so a LoRA adapter (or a reference model loaded by path) needs them there. Rank 0
    writes; the others wait until the files are whole, as they may load them next."""
    with main_first():
        if is_main():
            model.save_pretrained(run_dir / BASE_MODEL_DIR)
    return run_dir / BASE_MODEL_DIR


def save_preset_base_for_lora(model, config: RunConfig, run_dir: Path) -> None:
    """save_base when the run trains an adapter on a preset: the adapter names base_model/ as its base."""
    if config.model.preset is not None and config.method.adapter:
        save_base(model, run_dir)


def start_model(config: RunConfig, tokenizer, run_dir: Path, console, labels: list[str] | None = None,
                task: str = "causal_lm"):
    """The model a stage starts from, before its method applies: the preset or pretrained weights (a preset's saved
    to base_model/ for an adapter), a classifier with one output per label for a head task; for method.type qlora
    that base quantized and frozen (a preset's reloaded from base_model/, as a hub model loads, so the adapter's
    base is the file it names; a classifier's new head stays unquantized, as it trains)."""
    from dsft.models.load import build_classifier, build_model, build_quantized, classifier_kwargs, resolve_dtype
    from dsft.models.quantize import QUANTIZATION_FILE, quantization_report, quantized_weights, report_line

    seed = config.train.seed

    def build():
        if labels is None:
            return build_model(config.model, tokenizer, seed)
        return build_classifier(config.model, tokenizer, seed, labels, task)

    if config.method.type != "qlora":
        model = build()
        save_preset_base_for_lora(model, config, run_dir)
        return model
    source = save_base(build(), run_dir) if config.model.preset is not None else None
    extra = {} if labels is None else classifier_kwargs(labels, tokenizer)
    model = build_quantized(config.model, tokenizer, config.method, source, task, **extra)
    console.print(report_line(quantization_report(model)), markup=False)
    if is_main():
        record = {"qlora": config.method.qlora.model_dump(), "dtype": str(resolve_dtype(config.model.dtype)).removeprefix("torch."),
                  "weights": quantized_weights(model)}
        (run_dir / QUANTIZATION_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return model


def checkpoint_step(checkpoint: Path) -> int:
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state["global_step"])


def save_config(config: RunConfig, run_dir: Path) -> None:
    if not is_main():
        return
    (run_dir / CONFIG_FILE).write_text(dump_config(config), encoding="utf-8")


def write_summary(run_dir: Path, summary: dict, tracker=None) -> None:
    """summary.json, the last file a stage writes; then the stage's MLflow run (tracker) gets the run directory's
    small files and ends."""
    if not is_main():
        return
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if tracker is not None:
        tracker.finish(run_dir)
