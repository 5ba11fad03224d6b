"""Config loading, overrides and the errors users see."""

from pathlib import Path

import pytest
import yaml

from dsft.config import (
    RunConfig,
    apply_override,
    dump_config,
    load_config,
    validate_config,
    validate_files,
)
from dsft.errors import DsftError

MINIMAL = "model:\n  preset: tiny-llama\ndata:\n  train_files: train.jsonl\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str, overrides=()) -> str:
    with pytest.raises(DsftError) as info:
        load_config(write(tmp_path, text), overrides)
    return str(info.value)


def test_minimal_config_fills_every_default(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.data.train_files == ["train.jsonl"]
    assert config.method.type == "lora" and config.method.lora.r == 16
    assert config.train.learning_rate == 2e-4 and config.train.lr_scheduler == "cosine"
    assert config.model.trust_remote_code is False
    assert config.output.dir == "runs/dsft-run"


def test_dump_round_trips_to_the_same_config(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    again = validate_config(yaml.safe_load(dump_config(config)))
    assert again == config
    assert set(yaml.safe_load(dump_config(config))) == {"stage", "task", "model", "data", "method", "train", "eval", "output",
                                                        "tracking", "gate"}


def test_overrides_parse_values_as_yaml(tmp_path):
    config = load_config(
        write(tmp_path, MINIMAL),
        ["train.learning_rate=1e-4", "train.gradient_checkpointing=true", "method.lora.target_modules=[q_a_proj, kv_b_proj]"],
    )
    assert config.train.learning_rate == 1e-4
    assert config.train.gradient_checkpointing is True
    assert config.method.lora.target_modules == ["q_a_proj", "kv_b_proj"]


def test_override_without_equals_is_an_error():
    with pytest.raises(DsftError, match="expected key.path=value"):
        apply_override({}, "train.learning_rate")


def test_override_into_a_value_is_an_error():
    with pytest.raises(DsftError, match="train.seed is a value, not a section"):
        apply_override({"train": {"seed": 1}}, "train.seed.x=2")


def test_override_reaches_a_list_entry_by_its_index():
    raw = {"stages": [{"name": "a"}, {"name": "b", "train": {"max_steps": 9}}]}
    apply_override(raw, "stages.1.train.max_steps=3")
    apply_override(raw, "stages.0.train.seed=7")
    assert raw == {"stages": [{"name": "a", "train": {"seed": 7}}, {"name": "b", "train": {"max_steps": 3}}]}
    with pytest.raises(DsftError, match=r"stages.2: stages has entries 0 to 1"):
        apply_override(raw, "stages.2.train.max_steps=3")
    with pytest.raises(DsftError, match=r"stages.first: stages has entries 0 to 1"):
        apply_override(raw, "stages.first=3")


def test_unknown_key_names_path_line_and_allowed_keys(tmp_path):
    message = error_of(tmp_path, MINIMAL + "train:\n  learning_rat: 1e-4\n")
    assert "train.learning_rat (line 6): unknown key; allowed here: learning_rate, epochs," in message


def test_unknown_section_is_an_error(tmp_path):
    message = error_of(tmp_path, MINIMAL + "trian:\n  seed: 1\n")
    assert "trian (line 5): unknown key; allowed here: stage, task, model, data, method, train, eval, output, classify" in message


def test_wrong_type_and_bad_value_name_the_key(tmp_path):
    message = error_of(tmp_path, MINIMAL + "train:\n  batch_size: many\n  learning_rate: -1\n")
    assert "train.batch_size (line 6): Input should be a valid integer" in message
    assert "train.learning_rate (line 7): Input should be greater than 0" in message


def test_bad_choice_lists_what_is_allowed(tmp_path):
    message = error_of(tmp_path, MINIMAL + "method:\n  type: dora\n")
    assert "method.type (line 6): Input should be 'full', 'lora', 'qlora', 'prefix', 'ia3' or 'freeze' (got 'dora')" in message


def test_model_needs_exactly_one_source(tmp_path):
    both = "model:\n  preset: tiny-llama\n  name_or_path: x\ndata:\n  train_files: t.jsonl\n"
    assert "set exactly one of model.name_or_path" in error_of(tmp_path, both)


def test_missing_section_is_named(tmp_path):
    assert "data: required key is missing" in error_of(tmp_path, "model:\n  preset: tiny-llama\n")


def test_settings_for_another_method_are_an_error(tmp_path):
    text = MINIMAL + "method:\n  type: full\n  lora:\n    r: 8\n"
    assert "method.lora is set but method.type is 'full'" in error_of(tmp_path, text)


def test_validation_sources_are_exclusive(tmp_path):
    text = MINIMAL + "  validation_files: v.jsonl\n  validation_ratio: 0.1\n"
    assert "not both" in error_of(tmp_path, text)


def test_early_stopping_needs_eval_steps(tmp_path):
    assert "needs train.eval_steps" in error_of(tmp_path, MINIMAL + "train:\n  early_stopping_patience: 2\n")


def test_bad_override_value_is_reported_like_a_file_error(tmp_path):
    assert "train.epochs" in error_of(tmp_path, MINIMAL, ["train.epochs=zero"])


def test_yaml_syntax_error_names_the_line(tmp_path):
    assert "run.yaml:3: not valid YAML" in error_of(tmp_path, "model:\n  preset: [tiny-llama\ndata: 1\n")


def test_missing_file():
    with pytest.raises(DsftError, match="config file not found"):
        load_config("/nonexistent/run.yaml")


def test_every_field_has_a_docstring():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, type(RunConfig).__mro__[0]) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(RunConfig)


def test_shipped_examples_validate(capsys):
    examples = sorted(Path(__file__).parents[2].joinpath("examples").glob("*.yaml"))
    assert [p.name for p in examples] == ["dpo_after_quickstart.yaml", "grpo_quickstart.yaml", "kto_after_quickstart.yaml",
                                          "multitask_requests.yaml", "ner_chinese.yaml", "ner_english.yaml",
                                          "ppo_quickstart.yaml", "quickstart.yaml", "r1_distill_lora.yaml",
                                          "reward_model.yaml", "support_intent.yaml"]
    assert validate_files(examples)
    assert capsys.readouterr().out.count("ok ") == 11


def test_dump_writes_only_the_settings_of_the_method_in_use(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "method:\n  type: freeze\n"))
    method = yaml.safe_load(dump_config(config))["method"]
    moe = method.pop("moe")  # every method: it says what happens to an MoE model's routing
    assert method == {"type": "freeze", "freeze": {"trainable_layers": 2, "train_embeddings": False}, "unfreeze": []}
    assert moe["router"] == "auto" and moe["aux_loss"]["expert"] == 0.0


def test_shipped_data_preparation_example_validates():
    from dsft.config import load_yaml_model
    from dsft.data.prepare_config import PrepareConfig

    root = Path(__file__).parents[2]
    config = load_yaml_model(root / "examples" / "prepare" / "support.yaml", PrepareConfig)
    assert [step.step for step in config.steps] == ["clean", "filter_quality", "pii", "dedup"]
    assert (root / config.inputs[0]).is_file()


def test_stages_merge_into_the_config_and_errors_name_the_stage(tmp_path):
    stages = ("stages:\n  - name: domain\n    train:\n      max_steps: 5\n"
              "  - name: task\n    task: classification\n    train:\n      bogus: 1\n      learning_rate: -1\n"
              "  - name: domain\n  - name: other\n    model:\n      preset: tiny-qwen2\n")
    with pytest.raises(DsftError) as error:
        load_config(write(tmp_path, MINIMAL + stages))
    message = str(error.value)
    assert "stages.1.train.bogus (line 12): unknown key; allowed here: learning_rate" in message
    assert "stages.1.train.learning_rate (line 13): Input should be greater than 0 (got -1)" in message
    assert "stages.2.name (line 14): each stage needs a distinct name" in message
    assert "stages.3.model (line 16): a stage cannot set model" in message
    config = load_config(write(tmp_path, MINIMAL + "train:\n  seed: 7\nstages:\n  - name: a\n    train:\n      max_steps: 5\n"
                               "  - name: b\n    task: classification\n"))
    first, second = config.stage_configs
    assert (first.train.max_steps, first.train.seed, first.task) == (5, 7, "causal_lm")
    assert (second.train.max_steps, second.task) == (None, "classification")
    assert yaml.safe_load(dump_config(config))["stages"][1] == {"name": "b", "task": "classification"}


def test_packing_refuses_a_row_budget_outside_causal_lm_and_adversarial_training(tmp_path):
    classifier = MINIMAL + "task: classification\ntrain:\n  packing: true\n"
    assert load_config(write(tmp_path, classifier)).train.packing
    assert "task classification packs each batch as it comes" in error_of(tmp_path, classifier + "  pack_tokens: 4096\n")
    adversarial = classifier + "  adversarial:\n    method: fgm\n"
    assert "train.adversarial sizes its perturbation per sequence" in error_of(tmp_path, adversarial)
