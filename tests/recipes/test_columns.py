"""data.columns and data.tags through the real CLI: a dataset in its own field names trains on the same tokens as
the same data in dsft's names, the run's saved config keeps the map, and `dsft eval` reads held-out data in the
same layout through it."""

import json

import yaml

from dsft.config import load_config
from dsft.eval.evaluate import run_eval
from dsft.train.sft import run_sft

from .conftest import make_config

OWN_TAGS = {"role_tag": "who", "content_tag": "said", "user_tag": "client", "assistant_tag": "agent"}


def _own_layout(path, out):
    """The alpaca records of path as {"dialog": [{"who": "client", "said": ...}, {"who": "agent", ...}]}."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    out.write_text("".join(json.dumps({"dialog": [{"who": "client", "said": r["instruction"]},
                                                  {"who": "agent", "said": r["output"]}]}, ensure_ascii=False) + "\n"
                           for r in rows), encoding="utf-8")
    return out


def test_own_field_names_train_and_evaluate_like_dsfts(tmp_path, tiny_data):
    own = {name: _own_layout(tiny_data[name], tmp_path / f"own_{name}.jsonl") for name in ("train", "test")}
    summaries = {}
    for name, data in (("ours", {}), ("own", {"train_files": [str(own["train"])], "columns": {"messages": "dialog"},
                                              "tags": OWN_TAGS})):
        (tmp_path / name).mkdir()
        config = make_config(tmp_path / name, tiny_data, data=data, train={"max_steps": 1},
                             output={"dir": str(tmp_path / name / "run")})
        summaries[name] = run_sft(load_config(config)).summary
    for key in ("train_examples", "train_tokens", "trainable_tokens"):
        assert summaries["own"]["data"][key] == summaries["ours"]["data"][key], key
    run_dir = tmp_path / "own" / "run"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["data"]
    assert saved["columns"] == {"messages": "dialog"} and saved["tags"]["user_tag"] == "client"
    results = run_eval(str(run_dir), str(own["test"]), out_dir=str(tmp_path / "eval"),
                       overrides=["eval.bootstrap_resamples=20", "eval.speed_new_tokens=2", "eval.max_new_tokens=4"])
    assert results["data"]["examples"] == 8
