"""DPO end to end on tiny models: the reward margin and accuracy rise on a planted preference; LoRA leaves the base
weights bit-identical and the run loads in plain PEFT; full fine-tuning resumes from its checkpoint and loads in
plain transformers; a packed run logs the padded run's losses and margins; a bad preference record stops the real CLI
with file:line."""

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from dsft.cli import app, main
from dsft.config import load_config
from dsft.data.formats import Message
from dsft.errors import DsftError
from dsft.models.generate import prompt_ids
from dsft.train.dpo import run_dpo

from ..learning import NOT_LEARNING, Claim, assert_learned, assert_not_learned, learning
from .conftest import QUICKSTART, make_config, read_metrics

POLITE, RUDE = "happy to help.", "stop asking."


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory) -> dict:
    """Alpaca-style pairs on quickstart prompts: the same answer said politely (chosen) or rudely (rejected)."""
    lines = (QUICKSTART / "train.jsonl").read_text(encoding="utf-8").splitlines()[:128]
    pairs = [{"instruction": r["instruction"], "chosen": f"{r['output']}, {POLITE}", "rejected": f"{r['output']}, {RUDE}"}
             for r in map(json.loads, lines)]
    root = tmp_path_factory.mktemp("preferences")
    files = {"train": root / "train.jsonl", "validation": root / "validation.jsonl"}
    for name, chunk in (("train", pairs[:96]), ("validation", pairs[96:])):
        files[name].write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in chunk), encoding="utf-8")
    return files


def dpo_config(tmp_path, files, **sections):
    base = {"data": {"train_files": [str(files["train"])], "validation_files": [str(files["validation"])],
                     "max_length_tokens": 48},
            "train": {"learning_rate": 3e-3, "max_steps": 16, "batch_size": 8, "logging_steps": 2,
                      "lr_scheduler": "constant"}}
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values} if section in ("train", "data") else values
    path = make_config(tmp_path, {"train": files["train"]}, **base)
    path.write_text("stage: dpo\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    return path


LORA_DPO = {"beta": 0.1}
# At learning rate 3e-3 the margin of a logged batch swung between 1.0 and 1.8 from log to log, and where it landed
# after 16 steps depended on the CPU path (gain 0.66 on one AVX-512 machine, 1.26-1.39 here); at 1e-3 it climbs
# smoothly and 32 steps land it at the same place on every path (tests/cpu_paths.sh, AMD EPYC, torch 2.13):
#   train margin gain 2.109 on default, avx2 and avx512 (1 and 2 threads), bound 1.0;
#   validation log-prob margin gain 22.73 (default), 22.80 (avx2, avx512), bound 5; both accuracies 1.0.
# The same run at learning rate 1e-12 (does not learn): gain under 1e-6, accuracies 0.06-0.28.
LORA_DPO_TRAIN = {"learning_rate": 1e-3, "max_steps": 32}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, preference_files):
    """LoRA DPO on tiny DeepSeek-V3, run in process so the trained model can be inspected."""
    tmp_path = tmp_path_factory.mktemp("lora")
    return run_dpo(load_config(dpo_config(tmp_path, preference_files, dpo=LORA_DPO, train=LORA_DPO_TRAIN)))


def dpo_claims(summary: dict) -> list[Claim]:
    """What LoRA DPO on the planted preference must move."""
    return [
        Claim("train reward margin, last log - first", summary["train_rewards_margins_last_log"]
              - summary["train_rewards_margins_first_log"], ">", 1.0),
        Claim("train reward accuracy, last log", summary["train_rewards_accuracies_last_log"], ">=", 0.9),
        Claim("validation reward accuracy", summary["eval_rewards_accuracies"], ">=", 0.9),
        Claim("validation log p(chosen) - log p(rejected), after - before",
              summary["eval_logps_margin_after"] - summary["eval_logps_margin_before"], ">", 5),
    ]


@learning
def test_lora_dpo_raises_margin_and_accuracy_on_the_planted_preference(lora_run):
    summary = lora_run.summary
    assert_learned(dpo_claims(summary))
    assert summary["dpo"]["reference"].startswith("the policy with its LoRA adapter disabled")
    logged = [r for r in read_metrics(lora_run.run_dir) if "loss" in r]
    assert len(logged) == 16 and all({"rewards/margins", "rewards/accuracies", "rewards/chosen"} <= set(r) for r in logged)


@learning
def test_lora_dpo_that_does_not_learn_fails_the_claims(tmp_path, preference_files):
    assert_not_learned(dpo_claims(run_dpo(load_config(dpo_config(tmp_path, preference_files, dpo=LORA_DPO,
                                                                  train={**LORA_DPO_TRAIN, **NOT_LEARNING}))).summary))


def test_lora_dpo_leaves_base_weights_bit_identical_and_loads_in_plain_peft(lora_run):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    run_dir, model = lora_run.run_dir, lora_run.model
    assert list(model.peft_config) == ["default"]  # no copied "ref" adapter: the reference is the adapter switched off
    # base_model/ was written from the starting weights before training (loaded back: the MoE experts are saved
    # per expert and fused in memory).
    base_before = AutoModelForCausalLM.from_pretrained(run_dir / "base_model").state_dict()
    base_after = {name.replace(".base_layer", ""): tensor
                  for name, tensor in model.get_base_model().state_dict().items() if "lora_" not in name}
    assert base_before.keys() == base_after.keys()
    assert all(torch.equal(base_before[name], base_after[name]) for name in base_before)
    plain = AutoPeftModelForCausalLM.from_pretrained(run_dir).eval()
    template = load_config(run_dir / "config.yaml").data.chat_template
    ids = torch.tensor([prompt_ids((Message("user", "Convert 3 km to m."),), template, lora_run.tokenizer)])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits)


@learning
def test_full_dpo_resumes_from_its_checkpoint_and_loads_in_plain_transformers(tmp_path, preference_files):
    from transformers import AutoModelForCausalLM

    path = dpo_config(tmp_path, preference_files, model={"preset": "tiny-qwen2"}, method={"type": "full"},
                      train={"max_steps": 6, "save_steps": 3, "logging_steps": 3, "learning_rate": 1e-3},
                      data={"validation_files": []})
    runner = CliRunner()
    first = runner.invoke(app, ["train", str(path)], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    resumed = runner.invoke(app, ["train", str(path), "--set", "train.max_steps=9", "--resume"], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    run_dir = tmp_path / "run"
    assert "resuming from" in resumed.output and json.loads((run_dir / "summary.json").read_text())["steps"] == 9
    ledger = [json.loads(line)["step"] for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert ledger == list(range(1, 10))  # every step once: the resumed run continued at step 7
    margins = [r["rewards/margins"] for r in read_metrics(run_dir) if "rewards/margins" in r]
    # 1.572 on every path of tests/cpu_paths.sh; the LoRA run's twin that does not learn stays within 2e-7 of 0.
    assert_learned([Claim("train reward margin, last log - first", margins[-1] - margins[0], ">", 0.5)])
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    assert model.config.architectures == ["Qwen2ForCausalLM"]


def test_bad_preference_record_names_file_and_line(tmp_path, preference_files, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = preference_files["train"].read_text(encoding="utf-8").splitlines()[:4]
    lines[2] = json.dumps({"instruction": "Convert 3 km to m.", "chosen": "3000"})
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = dpo_config(tmp_path, {"train": bad, "validation": preference_files["validation"]})
    monkeypatch.setattr(sys, "argv", ["dsft", "train", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        main()  # the console script: a user error prints one line, no traceback
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"{bad}:3: field 'rejected' is missing" in err and "Traceback" not in err


def test_lora_run_start_and_settings_the_stage_would_ignore_are_refused(tmp_path, preference_files):
    lora_sft = tmp_path / "lora_sft"
    lora_sft.mkdir()
    (lora_sft / "adapter_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DsftError, match="holds a LoRA adapter, not full weights; .* merge the adapter first"):
        run_dpo(load_config(dpo_config(tmp_path, preference_files, model={"name_or_path": str(lora_sft)})))
    with pytest.raises(DsftError, match="train.pack_tokens is not supported by stage dpo"):
        run_dpo(load_config(dpo_config(tmp_path, preference_files, train={"packing": True, "pack_tokens": 64})))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_packed_dpo_logs_the_padded_runs_losses_and_margins(tmp_path, preference_files):
    """train.packing through the real CLI: each batch of pairs runs as one row, and every logged loss and reward
    margin equals the padded run's (tests/unit/test_packed_pairs.py checks one step's gradients)."""
    logs = {}
    for packing in (False, True):
        (tmp_path / f"packing_{packing}").mkdir()
        path = dpo_config(tmp_path / f"packing_{packing}", preference_files, model={"preset": "tiny-qwen2"},
                          method={"type": "full"}, data={"validation_files": []},
                          train={"max_steps": 3, "logging_steps": 1, "learning_rate": 1e-3, "packing": packing})
        result = CliRunner().invoke(app, ["train", str(path)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert ("packing: each batch of 8 pairs runs as one row" in result.output) == packing
        # The packed-row attention kernel needs CUDA: on CPU the model's own (sdpa, block-diagonal mask) stays.
        assert ("(attention unchanged: no CUDA: the block-diagonal mask)" in result.output) == packing
        run_dir = tmp_path / f"packing_{packing}" / "run"
        assert json.loads((run_dir / "summary.json").read_text())["packing"] == packing
        logs[packing] = [(r["loss"], r["rewards/margins"]) for r in read_metrics(run_dir) if "rewards/margins" in r]
    assert len(logs[True]) == 3
    torch.testing.assert_close(torch.tensor(logs[True]), torch.tensor(logs[False]), rtol=1e-4, atol=1e-6)


REFERENCE_FREE = {"simpo": {"loss": "simpo", "beta": 2.0, "simpo_gamma": 1.0}, "orpo": {"loss": "orpo", "beta": 0.1}}
# LoRA, LORA_DPO_TRAIN, on default, avx2 and avx512, 1 and default threads, MKL auto and compatible (tests/cpu_paths.sh,
# 12 paths, AVX-512 machine, torch 2.13): train margin gain in mean log-probability (rewards/margins / beta) 2.24-2.26
# simpo, 1.33 orpo; validation gain 2.38-2.40 simpo, 1.37 orpo; validation accuracy 1.0. At learning rate 1e-12:
# gains under 0.01, accuracy 0. Bounds 0.5.


def reference_free_claims(summary: dict, beta: float) -> list[Claim]:
    return [
        Claim("train mean log p margin, last log - first", (summary["train_rewards_margins_last_log"]
              - summary["train_rewards_margins_first_log"]) / beta, ">", 0.5),
        Claim("validation reward accuracy", summary["eval_rewards_accuracies"], ">=", 0.9),
        Claim("validation mean log p(chosen) - log p(rejected), after - before",
              summary["eval_logps_margin_after"] - summary["eval_logps_margin_before"], ">", 0.5),
    ]


@learning
@pytest.mark.parametrize("loss", REFERENCE_FREE)
def test_reference_free_losses_raise_the_margin_of_the_planted_preference(tmp_path, preference_files, loss):
    """dpo.loss simpo and orpo through the real stage, LoRA, no reference model: the margin of the answers' mean
    token log-probabilities rises on training and validation pairs (tests/unit/test_reference_free.py checks the
    loss itself against TRL's)."""
    summary = run_dpo(load_config(dpo_config(tmp_path, preference_files, dpo=REFERENCE_FREE[loss],
                                             train=LORA_DPO_TRAIN))).summary
    assert summary["dpo"]["reference"].startswith("none (loss")
    assert_learned(reference_free_claims(summary, REFERENCE_FREE[loss]["beta"]))


@learning
def test_a_reference_free_run_that_does_not_learn_fails_the_claims(tmp_path, preference_files):
    summary = run_dpo(load_config(dpo_config(tmp_path, preference_files, dpo=REFERENCE_FREE["orpo"],
                                             train={**LORA_DPO_TRAIN, **NOT_LEARNING}))).summary
    assert_not_learned(reference_free_claims(summary, REFERENCE_FREE["orpo"]["beta"]))


@learning
@pytest.mark.parametrize("loss", ["sigmoid", "orpo"])
def test_qlora_dpo_learns_the_planted_preference_on_a_4bit_base(tmp_path, preference_files, loss):
    """method.type qlora through TRL's DPOTrainer (sigmoid: the reference is the adapter-disabled 4-bit base) and the
    reference-free path (orpo)."""
    dpo = LORA_DPO if loss == "sigmoid" else REFERENCE_FREE[loss]
    summary = run_dpo(load_config(dpo_config(tmp_path, preference_files, dpo=dpo, train=LORA_DPO_TRAIN,
                                             method={"type": "qlora", "lora": {"r": 16, "alpha": 32}}))).summary
    assert summary["quantization"]["quantized_parameters"] > 0
    if loss == "sigmoid":
        assert_learned(dpo_claims(summary))
    else:
        assert_learned(reference_free_claims(summary, dpo["beta"]))
