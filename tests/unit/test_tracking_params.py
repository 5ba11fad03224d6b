"""The params dsft logs to MLflow: the resolved config flattened to dotted keys (dsft/train/tracking.py)."""

from dsft.config import RunConfig
from dsft.config.tracking import MlflowConfig
from dsft.train.tracking import MAX_PARAM_CHARS, flat_params


def test_config_flattens_to_dotted_keys_with_lists_as_json_and_long_values_cut():
    config = RunConfig.model_validate({
        "model": {"preset": "tiny-qwen2"},
        "data": {"train_files": ["a.jsonl", "b.jsonl"], "system_prompt": "x" * (MAX_PARAM_CHARS + 50)},
        "method": {"type": "lora", "lora": {"r": 4}},
    })
    params = flat_params(config)
    assert params["method.lora.r"] == "4" and params["method.type"] == "lora"
    assert params["data.train_files"] == '["a.jsonl", "b.jsonl"]'
    assert len(params["data.system_prompt"]) == MAX_PARAM_CHARS and params["data.system_prompt"].endswith("...(cut)")
    assert "method.freeze.trainable_layers" not in params  # config.yaml writes only the method in use
    assert all(isinstance(value, str) for value in params.values())


def test_the_embedded_store_sits_beside_the_run_directory(tmp_path):
    assert MlflowConfig().store_uri(tmp_path / "runs" / "a") == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').as_posix()}"
    assert MlflowConfig(tracking_uri="http://127.0.0.1:5000").store_uri(tmp_path) == "http://127.0.0.1:5000"
