"""dsft eval end to end on tiny runs: metrics, --against, rerun identity, data without references."""

import json
from pathlib import Path

import pytest

from dsft.config import load_config
from dsft.eval.evaluate import run_eval
from dsft.train.sft import run_sft

from ..learning import Claim, assert_learned, learning
from .conftest import make_config, read_metrics
from .test_sft import dsft_process, invoke

FAST = ["eval.bootstrap_resamples=200", "eval.speed_new_tokens=4", "eval.speed_batch_size=2", "eval.max_new_tokens=8"]


def train(tmp_path: Path, tiny_data, name: str, steps: int, **train_settings) -> Path:
    (tmp_path / name).mkdir()
    config = make_config(tmp_path / name, tiny_data, method={"type": "full"},
                         train={"max_steps": steps, **train_settings}, output={"dir": str(tmp_path / name / "run")})
    return run_sft(load_config(config)).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    tmp_path = tmp_path_factory.mktemp("eval")
    return {"trained": train(tmp_path, tiny_data, "trained", 30, learning_rate=3e-3),
            "barely": train(tmp_path, tiny_data, "barely", 1)}


@pytest.fixture(scope="module")
def compared(runs, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    output = invoke("eval", runs["trained"], "--data", tiny_data["test"], "--against", runs["barely"], "--out", out,
                    *[arg for item in FAST for arg in ("--set", item)])
    return out, json.loads((out / "results.json").read_text()), output


def test_eval_writes_results_report_and_plots(compared, tiny_data):
    out, results, output = compared
    assert {"results.json", "report.md", "metrics.png", "output_lengths.png", "loss_curves.png"} <= {p.name for p in out.iterdir()}
    target = results["models"]["target"]
    assert set(target["metrics"]) == {"exact_match", "f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "perplexity"}
    assert target["unavailable"] == {"semantic_similarity": "eval.embedding_model not set"}
    assert set(target["ci"]) >= {"exact_match", "f1", "bleu"}
    assert target["speed"]["device"] == "cpu" and target["speed"]["dtype"] == "float32"
    assert results["data"]["examples"] == 8 and len(results["data"]["sha256"]) == 64
    assert target["identity"]["kind"] == "run" and len(target["identity"]["weights_sha256"]) == 64
    first = results["examples"][0]
    assert first["rendered_prompt"]["target"].endswith("<｜Assistant｜>") and first["prompt"] in first["rendered_prompt"]["target"]
    assert "exact_match" in output and "report.md" in output


@learning
def test_against_gives_differences_and_won_lost_examples(compared):
    _, results, _ = compared
    target, against = results["models"]["target"], results["models"]["against"]
    for name, difference in results["differences"].items():
        assert difference == pytest.approx(target["metrics"][name] - against["metrics"][name])
    metric = results["won_lost_metric"]
    for index in results["won"]:
        scores = results["examples"][index]["scores"]
        assert scores["target"][metric] > scores["against"][metric]
    for index in results["lost"]:
        scores = results["examples"][index]["scores"]
        assert scores["target"][metric] < scores["against"][metric]
    # A model trained for 30 steps has a lower perplexity on the references than one trained for 1: 0.033 on every
    # path of tests/cpu_paths.sh (the SFT recipe's own claims check that a run that does not learn fails).
    assert_learned([Claim("perplexity on the references, 30 steps / 1 step",
                          target["metrics"]["perplexity"] / against["metrics"]["perplexity"], "<", 0.5)])


def test_a_rerun_gives_identical_numbers(runs, tiny_data, tmp_path, compared):
    _, first, _ = compared
    again = run_eval(str(runs["trained"]), str(tiny_data["test"]), str(runs["barely"]), str(tmp_path / "again"), FAST)
    for role in ("target", "against"):
        assert again["models"][role]["metrics"] == first["models"][role]["metrics"]
        assert again["models"][role]["ci"] == first["models"][role]["ci"]
    assert again["examples"] == first["examples"]


def test_data_without_references_gives_outputs_and_says_what_is_missing(runs, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"instruction": "Convert 5 km to m."}\n{"instruction": "把 3 千克换算成克。"}\n', encoding="utf-8")
    results = run_eval(str(runs["trained"]), str(data), None, str(tmp_path / "out"), FAST)
    target = results["models"]["target"]
    assert [example["target"] is not None for example in results["examples"]] == [True, True]
    assert target["unavailable"]["exact_match"] == "the data has no reference answers"
    assert "perplexity" in target["unavailable"] and "perplexity" not in target["metrics"]
    assert (tmp_path / "out" / "report.md").is_file()


def test_text_records_get_perplexity_only(runs, tmp_path):
    data = tmp_path / "held_out.jsonl"
    data.write_text('{"text": "Convert 5 km to m. 5000"}\n{"text": "把 3 千克换算成克。3000"}\n', encoding="utf-8")
    results = run_eval(str(runs["trained"]), str(data), None, str(tmp_path / "out"), FAST)
    target = results["models"]["target"]
    assert target["metrics"]["perplexity"] > 1.0 and target["perplexity_tokens"] > 10
    assert "generation" in target["unavailable"]


def test_bad_eval_setting_is_a_clear_error(runs, tiny_data):
    process = dsft_process("eval", runs["trained"], "--data", tiny_data["test"], "--set", "eval.bleu_tokenize=klingon")
    assert process.returncode == 2 and "eval.bleu_tokenize" in process.stderr and "Traceback" not in process.stderr


def test_training_logs_eval_metrics_at_eval_steps(tmp_path, tiny_data):
    config = make_config(tmp_path, tiny_data, method={"type": "full"}, data={"validation_ratio": 0.25},
                         train={"max_steps": 4, "eval_steps": 2},
                         eval={"generate_files": [str(tiny_data["test"])], "max_new_tokens": 6})
    run_dir = run_sft(load_config(config)).run_dir
    records = [r for r in read_metrics(run_dir) if "eval_perplexity" in r]
    assert [r["step"] for r in records] == [2, 4, 4]  # steps 2 and 4, then the final evaluation
    assert all(r["eval_perplexity"] > 1.0 and 0.0 <= r["eval_exact_match"] <= 1.0 and "eval_bleu" in r for r in records)


def test_classification_task_adds_labels_metrics_and_confusion_matrix(runs, tmp_path):
    data = tmp_path / "labels.jsonl"
    rows = [("Is 5000 m more than 4 km? Answer yes or no.", "yes"), ("Is 3 kg more than 4000 g? Answer yes or no.", "no")] * 3
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in rows), encoding="utf-8")
    results = run_eval(str(runs["trained"]), str(data), None, str(tmp_path / "out"), [*FAST, "eval.task=classification"])
    target = results["models"]["target"]
    report = target["classification"]
    assert set(report["per_class"]) == {"yes", "no"} and sum(sum(row) for row in report["confusion_matrix"]) == 6
    assert target["metrics"]["accuracy"] == report["accuracy"] and "macro_f1" in target["ci"]
    assert (tmp_path / "out" / "confusion_target.png").is_file()
    assert "## Classification: target" in (tmp_path / "out" / "report.md").read_text()
