"""expert_load.json and expert_load.png: which experts a model's routers send tokens to, per MoE layer, for one or
more phases (before and after training, or base and fine-tuned on an evaluation set), written by training
(train/moe.py) and by dsft eval."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dsft.models.moe import Router, load_stats, window_summary
from dsft.plots import new_figure, save_png

EXPERT_LOAD_JSON = "expert_load.json"
EXPERT_LOAD_PNG = "expert_load.png"


def expert_load_report(routers: list[Router], phases: dict, tokens: dict[str, int], **facts) -> dict:
    """{phase: counts_LE} as the report: per phase the routed sequences' token count, the summary numbers
    (moe.window_summary) and each layer's shares; facts (what was routed, adapted experts, ...) kept as given."""
    report = {"num_experts": max(router.num_experts for router in routers),
              "top_k": routers[0].top_k, "layers": [router.layer for router in routers], **facts, "phases": {}}
    for phase, counts_LE in phases.items():
        stats = load_stats(counts_LE, routers)
        report["phases"][phase] = {"tokens": tokens.get(phase), **window_summary(stats), "per_layer": stats}
    return report


def write_expert_load(out_dir: Path, report: dict) -> list[Path]:
    """expert_load.json (written aside, then renamed into place) and the heat map; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / EXPERT_LOAD_JSON
    staged = path.with_suffix(".json.tmp")
    staged.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(staged, path)
    heat_map(report, out_dir / EXPERT_LOAD_PNG)
    return [path, out_dir / EXPERT_LOAD_PNG]


def heat_map(report: dict, out_png: Path) -> None:
    """One layer x expert panel per phase, colour = share of the layer's routed pairs over the balanced share
    (1 = balanced), on one colour scale so phases compare at a glance."""
    import numpy as np

    phases = report["phases"]
    grids = {name: _grid(phase["per_layer"], report["num_experts"]) for name, phase in phases.items()}
    ceiling = max([float(np.nanmax(grid)) for grid in grids.values() if np.isfinite(grid).any()] + [2.0])
    figure = new_figure(1.5 + (1.8 + 0.1 * report["num_experts"]) * len(grids), 1.8 + 0.3 * len(report["layers"]))
    axes_row = figure.subplots(1, len(grids), squeeze=False)[0]
    image = None
    for axes, (name, grid) in zip(axes_row, grids.items()):
        image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=ceiling, interpolation="nearest")
        summary = phases[name]
        imbalance = summary.get("moe_load_imbalance")
        axes.set_title(name + (f"\nmax/mean {imbalance:.2f}" if imbalance is not None else ""), fontsize=9)
        axes.set(xlabel="expert", ylabel="layer")
        axes.set_yticks(range(len(report["layers"])), [str(layer) for layer in report["layers"]])
    figure.colorbar(image, ax=list(axes_row), label="load / balanced load")
    save_png(figure, out_png)


def _grid(per_layer: list[dict], num_experts: int):
    import numpy as np

    grid = np.full((len(per_layer), num_experts), np.nan)
    for row, layer in enumerate(per_layer):
        shares = np.asarray(layer["share"], dtype=float)
        if layer["routed_pairs"]:
            grid[row, : len(shares)] = shares * len(shares)
    return grid


def add_eval_expert_load(results: dict, measured: dict, names: dict[str, str], out: Path, data_path) -> None:
    """expert_load.json / .png of a dsft eval: measured is {role: (routers, counts_LE)} of each MoE model's passes
    over the evaluation set (target, and against when it has the same routed layers and experts), names each role's
    model; the phases' summaries also go into results["expert_load"]. Nothing when the target is dense."""
    if measured.get("target") is None:
        return
    routers = measured["target"][0]
    shape = [(r.layer, r.num_experts) for r in routers]
    phases, tokens = {}, {}
    for role, (role_routers, counts_LE) in ((r, m) for r, m in measured.items() if m is not None):
        if [(r.layer, r.num_experts) for r in role_routers] == shape:
            phase = f"{role}: {names[role]}"
            phases[phase], tokens[phase] = counts_LE, int(counts_LE[0].sum()) // routers[0].top_k
    report = expert_load_report(routers, phases, tokens, data=str(data_path))
    write_expert_load(out, report)
    results["expert_load"] = {phase: {key: value for key, value in summary.items() if key != "per_layer"}
                              for phase, summary in report["phases"].items()}
