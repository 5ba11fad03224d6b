"""Progressive unfreezing: the schedule in force, which parameters each state trains, and setup errors."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from dsft.config import MethodConfig, UnfreezeStep
from dsft.errors import DsftError
from dsft.models.method import apply_method
from dsft.models.presets import preset_config
from dsft.train.unfreeze import ProgressiveUnfreezing, layers_in_force, parameter_groups, top_layer_indices

SCHEDULE = [UnfreezeStep(step=0, layers=0), UnfreezeStep(step=3, layers=1), UnfreezeStep(step=6, layers="all")]


def tiny(kind=AutoModelForCausalLM):
    config = preset_config("tiny-llama", vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.num_labels = 3
    torch.manual_seed(0)
    return kind.from_config(config, dtype=torch.float32)


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_the_entry_in_force_is_the_last_one_due():
    assert [layers_in_force(SCHEDULE, s) for s in range(8)] == [0, 0, 0, 1, 1, 1, "all", "all"]
    late = [UnfreezeStep(step=5, layers=2)]
    assert [layers_in_force(late, s) for s in (0, 4, 5)] == [0, 0, 2]  # only the head before the first entry
    assert top_layer_indices(0, 4) == [] and top_layer_indices(1, 4) == [3] and top_layer_indices("all", 4) == [0, 1, 2, 3]


def test_full_fine_tuning_goes_from_head_and_norm_to_every_weight():
    model, records, lines = tiny(), [], []
    callback = ProgressiveUnfreezing(model, SCHEDULE, lines.append, records.append)
    callback.on_train_begin(None, SimpleNamespace(global_step=0), None)
    assert trainable_names(model) == {"lm_head.weight", "model.norm.weight"}
    for step in (1, 2, 3):
        callback.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert trainable_names(model) - {"lm_head.weight", "model.norm.weight"} == {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.3.")}
    callback.on_step_end(None, SimpleNamespace(global_step=6), None)
    assert trainable_names(model) == {n for n, _ in model.named_parameters()}
    head_count = sum(p.numel() for p in (model.lm_head.weight, model.model.norm.weight))
    assert records[0] == {"step": 0, "trainable_layers": [], "trainable_parameters": head_count}
    assert [r["trainable_layers"] for r in records] == [[], [3], [0, 1, 2, 3]]
    assert records[-1]["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert lines[1] == f"step 3: training head, norm, layer 3 ({records[1]['trainable_parameters']:,} params)"
    assert lines[2].startswith("step 6: training head, norm, layers 0-3, embeddings (")


def test_a_resumed_run_starts_in_the_state_of_its_step_without_a_second_record():
    model, records = tiny(), []
    callback = ProgressiveUnfreezing(model, SCHEDULE, lambda line: None, records.append)
    callback.on_train_begin(None, SimpleNamespace(global_step=4), None)
    assert any(n.startswith("model.layers.3.") for n in trainable_names(model))
    assert not any(n.startswith("model.layers.2.") for n in trainable_names(model))
    callback.on_step_end(None, SimpleNamespace(global_step=5), None)
    assert records == []  # the records up to step 4 are the first run's


def test_lora_moves_only_adapter_weights_and_the_saved_head_always_trains():
    model = apply_method(tiny(AutoModelForSequenceClassification), MethodConfig(type="lora", lora={"r": 4}), "SEQ_CLS")
    groups = parameter_groups(model)
    assert not groups.embeddings and not groups.has_final_norm and groups.has_head
    callback = ProgressiveUnfreezing(model, SCHEDULE[:2], lambda line: None, lambda record: None)
    callback.on_train_begin(None, SimpleNamespace(global_step=3), None)
    names = trainable_names(model)
    assert {n for n in names if "lora_" not in n} == {"base_model.model.score.modules_to_save.default.weight"}
    assert names - {"base_model.model.score.modules_to_save.default.weight"} and all(".layers.3." in n for n in names if "lora_" in n)


def test_nothing_to_train_at_the_start_is_an_error():
    model = apply_method(tiny(), MethodConfig(type="lora", lora={"r": 4}))  # LoRA leaves lm_head frozen
    with pytest.raises(DsftError, match="modules_to_save"):
        ProgressiveUnfreezing(model, SCHEDULE, print, print)
    ProgressiveUnfreezing(model, [UnfreezeStep(step=0, layers=1)], print, print)


def test_more_layers_than_the_model_has_is_an_error():
    with pytest.raises(DsftError, match=r"method.unfreeze.1.layers: 5 but the model has 4 layers"):
        ProgressiveUnfreezing(tiny(), [UnfreezeStep(step=0, layers=0), UnfreezeStep(step=2, layers=5)], print, print)
