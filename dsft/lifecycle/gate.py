"""`dsft gate`, top to bottom: settings -> both models -> their scores (reused or evaluated) -> verdict -> report
and registry.

The candidate passes when no gated metric drops more than max_drop_percent of the baseline's value and no case of
the user's check suite (eval.checks) that the baseline passes fails on the candidate. Each model's scores come
from a dsft eval it already had on the same data (same sha256, same weights, same scoring settings) or from a
fresh one into the gate's directory; both are scored with one set of settings, the candidate's eval section. The
change of each metric gets a paired bootstrap interval over the test examples, so a drop inside the noise is told
apart from a real one. Exit codes fit CI: 0 pass, 1 fail, 2 error (every DsftError).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dsft.config import EvalConfig
from dsft.config.eval import eval_settings
from dsft.config.gate import GateConfig
from dsft.errors import DsftError
from dsft.lifecycle.gate_math import MEAN_OF_EXAMPLES, check_regressions, judge, paired_change_interval
from dsft.lifecycle.registry import REF_PREFIX, Ref, Registry, now_iso
from dsft.lifecycle.registry_views import eval_tag

GATE_FILE = "gate.json"
TEXT_METRICS = ("exact_match", "f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "perplexity",
                "semantic_similarity")
SCORING_KEYS = ("max_new_tokens", "batch_size", "max_samples", "task", "metrics", "bleu_tokenize",
                "rouge_tokenization", "embedding_model", "checks", "seed")
"""Eval settings that change the scores: an earlier eval is reused only when all of them match."""


@dataclass(frozen=True)
class Model:
    """One side of the gate: what the user wrote, the directory it resolved to, its registry version if any."""

    written: str
    path: Path
    version: object | None = None


def run_gate(candidate: str, overrides: dict, set_: list[str], out: str | None, store: str | None,
             console: Console | None = None) -> int:
    """Gate candidate as its run's gate section says, with overrides (gate field -> value, from the command line)
    applied; writes gate.json and gate.md into out; returns the exit code (0 pass, 1 fail). Raises DsftError for
    anything it cannot judge."""
    console = console or Console(soft_wrap=True)
    registry = Registry(store) if any(str(x).startswith(REF_PREFIX) for x in (candidate, overrides.get("against"))
                                      if x) else None
    cand = _model(candidate, registry)
    gate = _gate_settings(cand.path, overrides)
    base = _model(gate.against, registry)
    settings = eval_settings(_eval_section(cand.path), set_)
    _check_metric_names(gate.metrics, settings)
    data = Path(gate.data)
    if not data.is_file():
        raise DsftError(f"gate.data (--data): {data} is not a file")
    data_sha = hashlib.sha256(data.read_bytes()).hexdigest()
    out_dir = Path(out) if out else _default_out(cand.path, base.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = {role: _scores(model, role, data, data_sha, settings, out_dir, console)
              for role, model in (("baseline", base), ("candidate", cand))}
    report = _verdict(gate, settings, scores, cand, base, data, data_sha)
    _write(report, out_dir)
    _print(report, console)
    _record(registry, report, scores, cand, base, out_dir)
    return 0 if report["verdict"] == "pass" else 1


def parse_percent(text: str, option: str) -> float:
    """5% or 5 -> 5.0; raises DsftError naming option otherwise."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise DsftError(f"{option} {text!r}: a percent, e.g. 5%") from None
    if not 0 <= value <= 100:
        raise DsftError(f"{option} {text!r}: between 0% and 100%")
    return value


def _model(written: str | None, registry: Registry | None) -> Model:
    if written is None:
        raise DsftError("the gate needs a baseline: --against RUN_OR_MODEL (or gate.against in the run's config)")
    if written.startswith(REF_PREFIX):
        ref = Ref.parse(written)
        return Model(written, registry.run_dir(ref), registry.version(ref))
    path = Path(written)
    if not path.is_dir():
        raise DsftError(f"{written}: no such run or model directory (or write registry:NAME@ALIAS)")
    return Model(written, path)


def _gate_settings(candidate: Path, overrides: dict) -> GateConfig:
    from pydantic import ValidationError

    from dsft.config import load_config

    base = load_config(candidate / "config.yaml").gate if (candidate / "config.yaml").is_file() else GateConfig()
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        gate = GateConfig.model_validate({**base.model_dump(), **given})
    except ValidationError as exc:
        raise DsftError("; ".join(f"gate.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    if gate.data is None:
        raise DsftError("the gate needs test data: --data FILE (or gate.data in the run's config)")
    return gate


def _eval_section(path: Path) -> EvalConfig:
    from dsft.config import load_config

    return load_config(path / "config.yaml").eval if (path / "config.yaml").is_file() else EvalConfig()


def _check_metric_names(metrics: list[str], settings: EvalConfig) -> None:
    allowed = [*TEXT_METRICS, *(check.name for check in settings.checks)]
    unknown = [name for name in metrics if name not in allowed]
    if unknown:
        raise DsftError(f"gate.metrics (--metrics): {', '.join(unknown)} unknown; allowed: {', '.join(allowed)}")
    if not metrics:
        raise DsftError("gate.metrics (--metrics): name at least one metric")


def _default_out(candidate: Path, baseline: Path) -> Path:
    if (candidate / "config.yaml").is_file():
        return candidate / "gate" / baseline.resolve().name
    return Path(f"gate-{candidate.resolve().name}-vs-{baseline.resolve().name}")


def _scores(model: Model, role: str, data: Path, data_sha: str, settings: EvalConfig, out_dir: Path,
            console: Console) -> dict:
    """{metrics, per_example, results, source} of model on data: an earlier eval's when one matches, else a new
    dsft eval written to out_dir/eval-ROLE."""
    from dsft.eval.evaluate import run_eval
    from dsft.eval.targets import weights_sha256

    weights = weights_sha256(model.path)
    for found in _earlier_evals(model.path, out_dir):
        section = _matching_role(found, weights, data_sha, settings)
        if section is not None:
            console.print(f"{role}: reusing the eval in {found.parent}", markup=False)
            return _scores_of(json.loads(found.read_text(encoding="utf-8")), section, str(found.parent))
    console.print(f"{role}: evaluating {model.written} on {data}", markup=False)
    target = out_dir / f"eval-{role}"
    results = run_eval(str(model.path), str(data), out_dir=str(target), console=console, settings=settings)
    return _scores_of(results, "target", str(target))


def _earlier_evals(path: Path, out_dir: Path) -> list[Path]:
    found = [*path.glob("eval*/results.json"), *path.glob("gate/*/eval-*/results.json"),
             *out_dir.glob("eval-*/results.json")]
    return sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True)  # the newest first


def _matching_role(results_file: Path, weights: str | None, data_sha: str, settings: EvalConfig) -> str | None:
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
        if weights is None or results["data"]["sha256"] != data_sha or "examples" not in results:
            return None
        wanted = settings.model_dump(mode="json")
        if any(results["settings"].get(key) != wanted[key] for key in SCORING_KEYS):
            return None
        return next((role for role, section in results["models"].items()
                     if section["identity"].get("weights_sha256") == weights), None)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable or older file is not reused, never trusted


def _scores_of(results: dict, role: str, source: str) -> dict:
    section = results["models"][role]
    names = {name for example in results["examples"] for name in example["scores"].get(role, {})}
    per_example = {name: [example["scores"][role].get(name) for example in results["examples"]] for name in names}
    return {"metrics": section["metrics"], "per_example": per_example, "results": results, "role": role,
            "source": source, "name": section["name"]}


def _verdict(gate: GateConfig, settings: EvalConfig, scores: dict, cand: Model, base: Model, data: Path,
             data_sha: str) -> dict:
    base_s, cand_s = scores["baseline"], scores["candidate"]
    if len(base_s["results"]["examples"]) != len(cand_s["results"]["examples"]):
        raise DsftError("the two evals scored different numbers of examples; rerun the gate with a fresh --out")
    verdicts = []
    for name in gate.metrics:
        missing = [role for role, s in scores.items() if name not in s["metrics"]]
        if missing:
            why = scores[missing[0]]["results"]["models"][scores[missing[0]]["role"]]["unavailable"].get(name, "")
            raise DsftError(f"gate.metrics: {name} was not measured for the {missing[0]} {why}".rstrip())
        interval = None
        if name in MEAN_OF_EXAMPLES or name in {check.name for check in settings.checks}:
            interval = paired_change_interval(base_s["per_example"].get(name, []),
                                              cand_s["per_example"].get(name, []), gate.resamples, settings.seed,
                                              gate.confidence)
        verdicts.append(judge(name, base_s["metrics"][name], cand_s["metrics"][name], interval,
                              gate.max_drop_percent, gate.require_significance).as_dict())
    regressions = {check.name: check_regressions(base_s["per_example"].get(check.name, []),
                                                 cand_s["per_example"].get(check.name, []))
                   for check in settings.checks}
    passed = all(v["passed"] for v in verdicts) and not any(regressions.values())
    return {"verdict": "pass" if passed else "fail", "time": now_iso(), "candidate": cand.written,
            "baseline": base.written, "data": str(data), "data_sha256": data_sha, "examples":
            len(cand_s["results"]["examples"]), "max_drop_percent": gate.max_drop_percent,
            "require_significance": gate.require_significance, "confidence": gate.confidence, "metrics": verdicts,
            "check_regressions": regressions, "evals": {role: s["source"] for role, s in scores.items()}}


def _write(report: dict, out_dir: Path) -> None:
    (out_dir / GATE_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = [f"# Gate: {report['verdict'].upper()}", "",
             (f"Candidate `{report['candidate']}` against baseline `{report['baseline']}` on `{report['data']}` "
              f"({report['examples']} examples), bound {report['max_drop_percent']:g}% per metric."), "",
             "| metric | baseline | candidate | change interval | verdict |", "|---|---|---|---|---|"]
    for v in report["metrics"]:
        span = (f"[{v['interval_percent'][0]:+.2f}%, {v['interval_percent'][1]:+.2f}%]"
                if v["interval_percent"] else "-")
        lines.append(f"| {v['name']} | {v['baseline']:.4g} | {v['candidate']:.4g} | {span} | "
                     f"{'pass' if v['passed'] else 'FAIL'}: {v['why']} |")
    for check, cases in report["check_regressions"].items():
        lines.append("")
        lines.append(f"Check `{check}`: " + (f"{len(cases)} case(s) the baseline passes now fail: examples "
                                             f"{', '.join(map(str, cases[:20]))}" if cases else "no regression"))
    (out_dir / "gate.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _print(report: dict, console: Console) -> None:
    table = Table("metric", "baseline", "candidate", "verdict", title=f"gate: {report['verdict'].upper()}")
    for v in report["metrics"]:
        table.add_row(v["name"], f"{v['baseline']:.4g}", f"{v['candidate']:.4g}",
                      ("pass: " if v["passed"] else "FAIL: ") + v["why"])
    console.print(table)
    for check, cases in report["check_regressions"].items():
        if cases:
            console.print(f"check {check}: {len(cases)} case(s) regressed (examples {cases[:20]})", markup=False)


def _record(registry: Registry | None, report: dict, scores: dict, cand: Model, base: Model, out_dir: Path) -> None:
    """The verdict on the candidate's registry version (and each side's scores on its own version)."""
    if registry is None:
        return
    for role, model in (("candidate", cand), ("baseline", base)):
        if model.version is not None:
            key, value = eval_tag(scores[role]["results"], scores[role]["role"])
            registry.set_tag(model.version, key, value)
    if cand.version is not None:
        summary = {k: report[k] for k in ("verdict", "time", "baseline", "data", "data_sha256", "max_drop_percent")}
        failed_checks = [f"check {name}" for name, cases in report["check_regressions"].items() if cases]
        summary["failed"] = [v["name"] for v in report["metrics"] if not v["passed"]] + failed_checks
        registry.set_tag(cand.version, "dsft.gate", summary)
        registry.add_event(cand.version, "gate", **summary)
        if cand.version.run_id:  # the whole report beside the version's MLflow run
            with registry.talking():
                for name in (GATE_FILE, "gate.md"):
                    registry.client.log_artifact(cand.version.run_id, str(out_dir / name), artifact_path="gate")
