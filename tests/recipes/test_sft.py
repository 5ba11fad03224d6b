"""The real CLI end to end on tiny models: each method learns, runs load in plain PEFT, resume, generate."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dsft.cli import app
from dsft.config import load_config
from dsft.data.formats import Message
from dsft.models.load import load_run
from dsft.serve.chat import chat_loop
from dsft.models.generate import DecodeSettings, generate_batch, prompt_ids
from dsft.train.sft import run_sft

from ..learning import NOT_LEARNING, Claim, assert_learned, assert_not_learned, learning, mean
from .conftest import make_config, read_metrics, train_losses

PROMPT = "Convert 37 km to m."


def invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def dsft_process(*args) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "dsft.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_data):
    tmp_path = tmp_path_factory.mktemp("lora")
    config = load_config(make_config(tmp_path, tiny_data, eval={"generate_files": [str(tiny_data["test"])], "max_new_tokens": 8}))
    return run_sft(config)


METHODS = [("full", "tiny-llama", "LlamaForCausalLM"), ("freeze", "tiny-qwen2", "Qwen2ForCausalLM"),
           ("lora", "tiny-deepseek-v3", None)]


def method_sections(method: str, preset: str) -> dict:
    sections = {"model": {"preset": preset}, "method": {"type": method}}
    if method == "freeze":
        sections["method"]["freeze"] = {"trainable_layers": 1}
    if method == "lora":
        sections["method"]["lora"] = {"r": 8, "alpha": 64}
    return sections


def sft_claims(run_dir: Path) -> list[Claim]:
    losses = list(train_losses(run_dir).values())
    assert len(losses) == 12
    # Against the first step's loss (the untrained model's, the same for a run that does not learn): the first 3
    # steps' mean already holds most of the drop LoRA makes, which left LoRA at 0.889 against 0.9. A low-rank update
    # of a random-init model learns slowest and levels off near 4.85 from 5.94; a run that does not learn stays
    # within the batches' spread of 1 (0.99-1.01). Measured on every path of tests/cpu_paths.sh (AMD EPYC; default,
    # avx2, avx512; 1 and 2 threads; MKL's own and its compatible summation order): full 0.496, freeze 0.467,
    # LoRA 0.825 (PGD 0.843); not learning 1.012, 0.991, 1.002 (PGD 1.002).
    return [Claim("train loss, mean of the last 3 steps / the first step", mean(losses[-3:]) / losses[0], "<", 0.9)]


@learning
@pytest.mark.parametrize(("method", "preset", "architecture"), METHODS)
def test_each_method_learns_and_writes_a_run_directory(tmp_path, tiny_data, method, preset, architecture):
    invoke("train", make_config(tmp_path, tiny_data, **method_sections(method, preset)))
    run_dir = tmp_path / "run"
    assert_learned(sft_claims(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens_per_second"] > 0
    assert (summary["trainable_parameters"] == summary["total_parameters"]) == (method == "full")
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (run_dir / weights).is_file() and (run_dir / "tokenizer.json").is_file()
    assert not list(run_dir.glob("*.bin")), "weights must be safetensors, never pickle"
    if architecture:
        assert json.loads((run_dir / "config.json").read_text())["architectures"] == [architecture]
    assert load_config(run_dir / "config.yaml").method.type == method


@learning
@pytest.mark.parametrize(("method", "preset"), [(m, p) for m, p, _ in METHODS])
def test_each_method_that_does_not_learn_fails_the_claims(tmp_path, tiny_data, method, preset):
    invoke("train", make_config(tmp_path, tiny_data, **method_sections(method, preset), train=NOT_LEARNING))
    assert_not_learned(sft_claims(tmp_path / "run"))


def test_freeze_trains_only_the_top_layers_and_head(tmp_path, tiny_data):
    result = run_sft(load_config(make_config(tmp_path, tiny_data, model={"preset": "tiny-llama"},
                                             method={"type": "freeze", "freeze": {"trainable_layers": 1}},
                                             train={"max_steps": 1})))
    trainable = {name.split(".")[2] if ".layers." in name else name for name, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == {"3", "model.norm.weight", "lm_head.weight"}


def test_lora_run_loads_in_plain_peft_with_the_same_logits(lora_run):
    from peft import AutoPeftModelForCausalLM

    assert lora_run.summary["trainable_parameters"] < lora_run.summary["total_parameters"]
    plain = AutoPeftModelForCausalLM.from_pretrained(lora_run.run_dir).eval()
    lora_run.model.eval()
    input_ids = torch.tensor([prompt_ids([Message("user", PROMPT)], "deepseek_v3", lora_run.tokenizer)])
    with torch.no_grad():
        expected = lora_run.model(input_ids=input_ids).logits
        got = plain(input_ids=input_ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_lora_targets_deepseek_mla_module_names(lora_run):
    targets = set(lora_run.model.peft_config["default"].target_modules)
    assert {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"} <= targets


def test_exact_match_is_measured_before_and_after(lora_run):
    summary = lora_run.summary
    assert 0.0 <= summary["exact_match_before"] <= 1.0 and 0.0 <= summary["exact_match_after"] <= 1.0
    assert len(summary["exact_match_samples"]) == 5


def test_generate_cli_answers_as_the_in_memory_model(lora_run):
    model, tokenizer, config = load_run(lora_run.run_dir)
    ids = prompt_ids([Message("user", PROMPT)], config.data.chat_template, tokenizer)
    expected = generate_batch(model, tokenizer, [ids], DecodeSettings(max_new_tokens=12))[0]
    output = invoke("generate", lora_run.run_dir, "--prompt", PROMPT, "--max-new-tokens", 12)
    assert output.rstrip("\n") == expected


def test_chat_streams_replies_and_keeps_history(lora_run):
    lines = [PROMPT, "", "Convert 2 kg to g."]

    def read_line() -> str:
        if not lines:
            raise EOFError  # what input() raises on Ctrl-D
        return lines.pop(0)

    history = chat_loop(lora_run.run_dir, None, DecodeSettings(max_new_tokens=12), seed=0, read_line=read_line)
    assert [m.role for m in history] == ["user", "assistant", "user", "assistant"]
    model, tokenizer, config = load_run(lora_run.run_dir)
    ids = prompt_ids([Message("user", PROMPT)], config.data.chat_template, tokenizer)
    assert history[1].content == generate_batch(model, tokenizer, [ids], DecodeSettings(max_new_tokens=12))[0].strip()


def test_resume_reproduces_the_uninterrupted_trajectory(tmp_path, tiny_data):
    config_path = make_config(tmp_path, tiny_data, train={"save_steps": 6, "keep_last_checkpoints": 3})
    invoke("train", config_path)
    run_dir = tmp_path / "run"
    straight = train_losses(run_dir)
    # Make the run look as if it had been killed right after the checkpoint of step 6.
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-12")
    for name in ("adapter_model.safetensors", "summary.json"):
        (run_dir / name).unlink()
    invoke("train", config_path, "--resume")
    # Resuming replays the same shapes on the same CPU path in this process: equal to rounding on any path.
    resumed = train_losses(run_dir)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7)
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 13))


def test_existing_run_is_never_overwritten_by_accident(lora_run, tmp_path, tiny_data):
    config_path = make_config(tmp_path, tiny_data, output={"dir": str(lora_run.run_dir)})
    process = dsft_process("train", config_path)
    assert process.returncode == 2
    assert "already holds a run" in process.stderr and "Traceback" not in process.stderr


def test_config_error_is_one_message_without_traceback(tmp_path, tiny_data):
    config_path = make_config(tmp_path, tiny_data, train={"learning_rat": 1})
    process = dsft_process("train", config_path)
    assert process.returncode == 2
    assert "train.learning_rat" in process.stderr and "unknown key" in process.stderr
    assert "Traceback" not in process.stderr


def test_bad_record_names_file_and_line(tmp_path, tiny_data):
    bad = tmp_path / "bad.jsonl"
    lines = tiny_data["train"].read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join([lines[0], lines[1], '{"instruction": "x", "output": ', *lines[2:]]) + "\n", encoding="utf-8")
    process = dsft_process("train", make_config(tmp_path, tiny_data, data={"train_files": [str(bad)]}))
    assert process.returncode == 2 and f"{bad}:3" in process.stderr and "Traceback" not in process.stderr


def test_on_error_skip_counts_the_bad_records(tmp_path, tiny_data):
    bad = tmp_path / "bad.jsonl"
    lines = tiny_data["train"].read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join([*lines, '{"instruction": "x"}', "not json"]) + "\n", encoding="utf-8")
    original = bad.read_bytes()
    config = load_config(make_config(tmp_path, tiny_data, data={"train_files": [str(bad)], "on_error": "skip"}, train={"max_steps": 1}))
    summary = run_sft(config).summary
    assert summary["data"]["skipped_bad"] == 2 and summary["data"]["train_examples"] == 64
    assert bad.read_bytes() == original, "input files are never modified"


def test_cli_help_imports_no_torch():
    code = "import sys, dsft.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_local_model_directory_trains_like_a_hub_model(tmp_path, tiny_data, lora_run):
    """model.name_or_path pointing at a local HF directory (what a downloaded hub model is)."""
    local = tmp_path / "local-model"
    model, tokenizer, _ = load_run(lora_run.run_dir)
    model.merge_and_unload().save_pretrained(local)
    tokenizer.save_pretrained(local)
    config_path = make_config(tmp_path, tiny_data, model={"name_or_path": str(local)}, train={"max_steps": 2})
    config = load_config(config_path)
    assert config.model.preset is None
    result = run_sft(config)
    adapter = json.loads((result.run_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(local)
    assert not (result.run_dir / "base_model").exists()
    # The tokenizer came with the model: auto recognises its saved template (the deepseek_v3 twin) as deepseek_v3.
    assert load_config(result.run_dir / "config.yaml").data.chat_template == "deepseek_v3"


def test_missing_model_directory_is_a_clear_error(tmp_path, tiny_data):
    config_path = make_config(tmp_path, tiny_data, model={"name_or_path": str(tmp_path / "nowhere")})
    process = dsft_process("train", config_path)
    assert process.returncode == 2
    assert "model.name_or_path: cannot load" in process.stderr and "Traceback" not in process.stderr


def test_validation_eval_early_stopping_tensorboard_and_checkpointing(tmp_path, tiny_data):
    # A learning rate this high makes the validation loss worse at every evaluation, so early
    # stopping with patience 1 must end the run after the second evaluation (step 4 of 12).
    config_path = make_config(
        tmp_path,
        tiny_data,
        method={"type": "full"},
        data={"validation_ratio": 0.25},
        train={"learning_rate": 1.0, "eval_steps": 2, "save_steps": 2, "early_stopping_patience": 1,
               "tensorboard": True, "gradient_checkpointing": True, "grad_accum_steps": 2, "batch_size": 4},
    )
    invoke("train", config_path)
    run_dir = tmp_path / "run"
    evals = [r for r in read_metrics(run_dir) if "eval_loss" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"]["validation_examples"] == 16 and summary["data"]["train_examples"] == 48
    assert summary["steps"] < 12 and len(evals) >= 2
    assert summary["final_eval_loss"] is not None
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_saved_tokenizer_template_renders_the_trained_prompt(lora_run):
    """Plain transformers' apply_chat_template on the run's tokenizer gives dsft's prompt tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lora_run.run_dir)
    messages = [Message("system", "Be brief."), Message("user", PROMPT), Message("assistant", "37000"), Message("user", "And 2 kg?")]
    chat = [{"role": m.role, "content": m.content} for m in messages]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == prompt_ids(messages, "deepseek_v3", tokenizer)


def test_reasoning_data_trains_with_the_r1_template(tmp_path, tiny_data):
    from transformers import AutoTokenizer

    sample = Path(__file__).parents[2] / "examples" / "data" / "reasoning_sample.jsonl"
    config_path = make_config(tmp_path, tiny_data, data={"train_files": [str(sample)], "chat_template": "deepseek_r1",
                                                         "max_length_tokens": 256}, train={"max_steps": 2, "batch_size": 3})
    result = run_sft(load_config(config_path))
    assert result.summary["data"]["train_examples"] == 3
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir)
    history = [Message("user", "Convert 3 km to m."), Message("assistant", "3000 m", "1 km = 1000 m."), Message("user", "And 5 km?")]
    chat = [{"role": "user", "content": "Convert 3 km to m."},
            {"role": "assistant", "content": "<think>\n1 km = 1000 m.\n</think>\n\n3000 m"},
            {"role": "user", "content": "And 5 km?"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<｜Assistant｜>3000 m<｜end▁of▁sentence｜><｜User｜>And 5 km?<｜Assistant｜><think>\n")
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == prompt_ids(history, "deepseek_r1", tokenizer)


PACKED = {"packing": True, "batch_size": 8, "max_steps": 6}


def packed_claims(run_dir: Path) -> list[Claim]:
    # 0.654 on every path of tests/cpu_paths.sh; 1.0 would sit inside the spread of a run that does not learn.
    losses = list(train_losses(run_dir).values())
    return [Claim("train loss, last step / first", losses[-1] / losses[0], "<", 0.9)]


@learning
def test_packed_training_learns_and_consumes_every_sample_once_per_epoch(tmp_path, tiny_data):
    result = run_sft(load_config(make_config(tmp_path, tiny_data, method={"type": "full"}, train=PACKED)))
    assert_learned(packed_claims(result.run_dir))
    ledger = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    rows_per_epoch = 64 * 17 // (8 * 64) + 1  # quickstart samples are ~17 tokens; rows hold 8 x 64 tokens
    consumed = [i for record in ledger[:rows_per_epoch] for i in record["sample_ids"]]
    assert len(consumed) > 8, "a packed row holds many samples"
    assert len(set(consumed)) == len(consumed), "no sample twice within an epoch"


@learning
def test_packed_training_that_does_not_learn_fails_the_claims(tmp_path, tiny_data):
    result = run_sft(load_config(make_config(tmp_path, tiny_data, method={"type": "full"}, train={**PACKED, **NOT_LEARNING})))
    assert_not_learned(packed_claims(result.run_dir))


def test_pack_tokens_below_max_length_is_a_config_error(tmp_path, tiny_data):
    process = dsft_process("train", make_config(tmp_path, tiny_data, train={"packing": True, "pack_tokens": 16}))
    assert process.returncode == 2 and "train.pack_tokens must be at least data.max_length_tokens" in process.stderr
