"""Every config in examples/ trains through the real CLI on its own data, as a user would run it from the repository
root, cut to a few steps (`--set`) and written under a temporary directory. What each example learns at full length
is shown by the recipe test of its stage; here each proves that its config and data files work together. The
examples that start from the quickstart's run are pointed at a short quickstart run made first; r1_distill_lora
names a hub model (no hub here), so it runs its data and settings on a preset instead."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsft.cli import app

ROOT = Path(__file__).parents[2]
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.yaml"))
SHORT = ["train.max_steps=3", "eval.max_samples=4"]
OVERRIDES = {
    "quickstart": SHORT,
    "dpo_after_quickstart": SHORT,
    "kto_after_quickstart": SHORT,
    "grpo_quickstart": [*SHORT, "data.max_samples=64"],
    "ppo_quickstart": [*SHORT, "data.max_samples=64"],
    "reward_model": SHORT,
    "r1_distill_lora": [*SHORT, "model.name_or_path=null", "model.preset=tiny-qwen2", "data.chat_template=deepseek_r1"],
    "support_intent": ["stages.0.train.max_steps=3", "stages.1.train.max_steps=3"],
    "ner_english": SHORT,
    "ner_chinese": SHORT,
    "multitask_requests": SHORT,
}
"""Each example's --set overrides; the examples that start from runs/quickstart get model.name_or_path too."""
FROM_QUICKSTART = ("dpo_after_quickstart", "kto_after_quickstart", "grpo_quickstart", "ppo_quickstart")


def train(example: str, out: Path, *overrides: str) -> dict:
    arguments = ["train", f"examples/{example}.yaml", "--set", f"output.dir={out}"]
    for override in (*OVERRIDES[example], *overrides):
        arguments += ["--set", override]
    result = CliRunner().invoke(app, arguments, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("examples") / "quickstart"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        train("quickstart", out)
    return out


def test_every_example_has_its_overrides():
    assert sorted(OVERRIDES) == EXAMPLES


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e != "quickstart"])
def test_each_example_trains_through_the_cli(example, quickstart_run, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    start = [f"model.name_or_path={quickstart_run}"] if example in FROM_QUICKSTART else []
    summary = train(example, tmp_path / example, *start)
    if example == "support_intent":
        assert [stage["name"] for stage in summary["stages"]] == ["domain", "intent"]
        assert all(stage["summary"]["steps"] == 3 for stage in summary["stages"])
    else:
        assert summary["steps"] == 3
    assert not any(p.suffix in (".bin", ".pt") and "checkpoint" not in str(p) for p in (tmp_path / example).rglob("*")
                   if p.name != "training_args.bin")
