"""`dsft bench`: B0, B1 and dsft side by side in one process, on the same samples, seed and steps; a table and a JSON
file of real tokens/s, peak memory, MFU and ratios, each speed behind the correctness gate (measure.gate).

Every setup's B0 runs before any B1 or dsft run: Liger (B1 and dsft on dense models) patches transformers' modeling
modules process-wide, and B0 must stay plain.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dsft.bench import measure, recipes
from dsft.bench.suites import Setup, suite_setups, synthetic_samples
from dsft.errors import DsftError

ORDER = ("B0", "B1", "dsft")
SEED = 0
NOT_RUN: dict = {}  # the outcome of a recipe a partial report has not reached yet


def run_bench(suite: str, output: Path | None = None, setups: list[str] | None = None, longest: bool = False,
              console: Console | None = None, profile: bool = False, row_tokens: int | None = None) -> dict:
    """Run suite (tiny or h100), optionally only the setups named (or their letters: a, b, c, d); print the table and
    write the JSON (default benchmarks/results/bench_<suite>.json). Returns the report. With profile, each recipe
    runs once more under torch.profiler (bench/profile.py), after its timed run. row_tokens sets every chosen
    setup's Setup.row_tokens (packed rows of B1 and dsft; B0 accumulates to match).

    Raises DsftError for an unknown suite or setup, for longest without CUDA, and for row_tokens below a setup's
    longest sample.
    """
    import torch

    console = console or Console(width=200)  # the table's columns stay whole when piped to a log
    chosen = _with_rows(_chosen(suite, setups), row_tokens)
    if longest and not torch.cuda.is_available():
        raise DsftError("dsft bench --longest searches for the out-of-memory length: it needs a CUDA GPU")
    path = output or Path("benchmarks/results") / f"bench_{suite}.json"
    runs: dict[tuple[str, str], dict] = {}
    with recipes.work_directory() as work_dir:
        for recipe in ORDER:
            for setup in chosen:
                console.print(f"bench: {setup.name}: {recipe}")
                runs[setup.name, recipe] = _run_one(recipe, setup, work_dir, longest, profile)
                report = _report(suite, chosen, runs)
                _write(path, report)  # a bench cut short (a time limit) keeps what it measured
    console.print(_table(report))
    for setup in report["setups"]:
        for recipe, row in setup["recipes"].items():
            if row["status"] != "ok":
                console.print(f"bench: {setup['name']} {recipe} {row['status']}: {row['reason']}")
            if row.get("profile"):
                console.print(_profile_line(setup["name"], recipe, row["profile"]))
    console.print(f"bench: wrote {path}")
    return report


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _chosen(suite: str, names: list[str] | None) -> list[Setup]:
    try:
        setups = suite_setups(suite)
    except ValueError as exc:
        raise DsftError(f"dsft bench --suite: {exc}") from None
    if not names:
        return setups
    chosen = [s for s in setups if s.name in names or s.name.split("-")[0] in names]
    unknown = set(names) - {s.name for s in chosen} - {s.name.split("-")[0] for s in chosen}
    if unknown:
        raise DsftError(f"dsft bench --setup: unknown {sorted(unknown)}; {suite} has {', '.join(s.name for s in setups)}")
    return chosen


def _with_rows(setups: list[Setup], row_tokens: int | None) -> list[Setup]:
    import dataclasses

    if row_tokens is None:
        return setups
    for setup in setups:
        if row_tokens < setup.max_tokens:
            raise DsftError(f"dsft bench --row-tokens {row_tokens}: a row must hold {setup.name}'s longest sample, "
                            f"{setup.max_tokens} tokens; allowed: at least {setup.max_tokens}")
    return [dataclasses.replace(setup, row_tokens=row_tokens) for setup in setups]


def _run_one(recipe: str, setup: Setup, work_dir: Path, longest: bool, profile: bool) -> dict:
    """One recipe on one setup; a failure (out of memory, an error in a library) is recorded, not raised."""
    import torch

    try:
        run = recipes.RECIPES[recipe](setup, synthetic_samples(setup, SEED), SEED, work_dir)
        if longest:
            run.longest_tokens = _longest(recipe, setup, work_dir)
        if profile:
            recipes.release_memory()
            with recipes.profiling():
                run.profile = recipes.RECIPES[recipe](setup, synthetic_samples(setup, SEED), SEED, work_dir).profile
        return {"run": run}
    except torch.OutOfMemoryError as exc:
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:  # noqa: BLE001 - a broken recipe is a row of the report, not the end of the bench
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    finally:
        recipes.release_memory()


def _longest(recipe: str, setup: Setup, work_dir: Path) -> int:
    """The longest single sample (tokens, to 256) one training step of recipe takes on this GPU: binary search
    between setup.max_tokens and the model's position limit, one fresh one-step run per probe."""
    import dataclasses

    import torch

    low, high = 0, setup.shape["max_position_embeddings"]
    while high - low > 256:
        length = (low + high) // 2 // 256 * 256 or 256
        probe = dataclasses.replace(setup, max_tokens=length, mean_tokens=length, warmup_steps=0, measured_steps=1,
                                    row_tokens=None)
        sample = synthetic_samples(probe, SEED)[0]
        sample = {"input_ids": (sample["input_ids"] * length)[:length], "labels": (sample["labels"] * length)[:length]}
        try:
            recipes.RECIPES[recipe](probe, [sample], SEED, work_dir)  # one step on one sample
            low = length
        except torch.OutOfMemoryError:
            high = length
        finally:
            recipes.release_memory()
    return low


def _report(suite: str, setups: list[Setup], runs: dict) -> dict:
    import torch
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    return {
        "suite": suite,
        "device": device,
        "versions": _versions(torch, transformers),
        "peak_tflops": list(measure.PEAK_TFLOPS),
        "loss_tolerance": measure.LOSS_TOLERANCE,
        "setups": [_setup_report(setup, runs) for setup in setups],
    }


def _setup_report(setup: Setup, runs: dict) -> dict:
    recipes_report = {recipe: _recipe_report(runs.get((setup.name, recipe), NOT_RUN)) for recipe in ORDER}
    b0 = recipes_report["B0"]
    if b0["status"] == "ok":
        b0["gate"] = measure.gate(b0["losses"], b0["grad_norms"], None)
    reference = b0["mean_loss"] if b0["status"] == "ok" and b0["gate"] is None else None
    for recipe in ORDER[1:]:
        row = recipes_report[recipe]
        if row["status"] == "ok":
            row["gate"] = measure.gate(row["losses"], row["grad_norms"], reference) if reference is not None \
                else "B0 failed or was refused: nothing to compare the loss with"
    for row in recipes_report.values():
        _apply_gate(row)
    for recipe in ORDER:
        row = recipes_report[recipe]
        for base in ("B0", "B1"):
            other = recipes_report[base]["tokens_per_s"]
            row[f"vs_{base}"] = row["tokens_per_s"] / other if row["tokens_per_s"] and other else None
    return {"name": setup.name, "model": setup.shape_name, "method": setup.method, "mean_tokens": setup.mean_tokens,
            "max_tokens": setup.max_tokens, "row_tokens": setup.packed_row_tokens,
            "b0_accumulation": setup.b0_accumulation, "warmup_steps": setup.warmup_steps, "measured_steps": setup.measured_steps,
            "matmul_params": measure.matmul_params(setup.shape), "recipes": recipes_report}


def _recipe_report(outcome: dict) -> dict:
    if outcome is NOT_RUN:
        return {"status": "not run", "reason": "the bench stopped before this recipe", "tokens_per_s": None}
    if "error" in outcome:
        return {"status": "failed", "reason": outcome["error"], "tokens_per_s": None}
    run = outcome["run"]
    measured = run.measured
    flops_per_s = measured.flops / measured.seconds
    return {"status": "ok", "tokens_per_s": measured.tokens_per_s, "real_tokens": measured.real_tokens,
            "seconds": measured.seconds, "peak_gib": run.peak_gib, **measure.mfu(flops_per_s),
            "mean_loss": measured.mean_loss, "losses": measured.losses, "grad_norms": measured.grad_norms,
            "longest_tokens": run.longest_tokens, "settings": run.settings, "profile": run.profile}


def _apply_gate(row: dict) -> None:
    """A refused row keeps its losses and reason but no speed."""
    if row["status"] != "ok" or row.get("gate") is None:
        return
    row.update(status="REFUSED", reason=row.pop("gate"), tokens_per_s=None, mfu_800=None, mfu_989=None)


def _versions(torch, transformers) -> dict:
    import importlib.metadata

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("trl", "peft", "liger-kernel"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _table(report: dict) -> Table:
    table = Table(title=f"dsft bench --suite {report['suite']} on {report['device']}")
    for column in ("setup", "recipe", "tokens/s", "x B0", "x B1", "peak GiB", "MFU@800", "MFU@989", "mean loss", "longest", "status"):
        table.add_column(column, justify="left" if column in ("setup", "recipe", "status") else "right")
    for setup in report["setups"]:
        for recipe, row in setup["recipes"].items():
            table.add_row(setup["name"], recipe, _number(row.get("tokens_per_s"), ",.0f"), _number(row.get("vs_B0"), ".2f"),
                          _number(row.get("vs_B1"), ".2f"), _number(row.get("peak_gib"), ".1f"),
                          _number(row.get("mfu_800"), ".1%"), _number(row.get("mfu_989"), ".1%"),
                          _number(row.get("mean_loss"), ".4f"), _number(row.get("longest_tokens"), ","),
                          row["status"])
    return table


def _profile_line(setup: str, recipe: str, summary: dict) -> str:
    shares = ", ".join(f"{label} {share:.0%}" for label, share in summary["categories"].items())
    busy = f", GPU busy {summary['busy_fraction']:.0%}" if summary["busy_fraction"] is not None else ""
    return f"profile {setup} {recipe}: limited by {summary['limited_by']}; {shares}{busy}"


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
