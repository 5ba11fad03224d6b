"""PPO's checkpoints: what `dsft train --resume` needs to continue a PPO run on the same trajectory.

A checkpoint-N (written through checkpoints.py: staged, manifested, renamed into place, rotated) holds the
policy's trainable weights (a LoRA adapter as PEFT saves it, else model.safetensors with the trainable
tensors; frozen ones equal the starting weights), value_head.safetensors, optimizer.pt (optimizer and LR
scheduler state), rng_state.pt (torch, CUDA, python, numpy and the prompt sampler's generator) and
trainer_state.json (the step, the prompt sampler's remaining order and the records so far, for the summary).
Nothing is unpickled: the .pt files load with weights_only=True.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from dsft.models.value_head import VALUE_HEAD_FILE, save_value_head
from dsft.train import checkpoints as ckpt
from dsft.train import run_dir as rd

FULL_WEIGHTS_FILE = "model.safetensors"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"
STATE_FILE = "trainer_state.json"


def save_ppo_checkpoint(run_dir: Path, step: int, policy, value_head, optimizer, scheduler, sampler,
                        records: list[dict], keep_last: int) -> Path:
    """Write checkpoints/checkpoint-{step} atomically, then keep only the newest keep_last; returns its path.

    Raises DsftError when the write fails (disk full names the space it needs); earlier checkpoints stay intact.
    """
    root = Path(run_dir) / rd.CHECKPOINTS_DIR
    staging_root = root / ckpt.STAGING_DIR
    shutil.rmtree(staging_root, ignore_errors=True)  # what a crash in an earlier save left
    staged = staging_root / f"checkpoint-{step}"
    try:
        staged.mkdir(parents=True)
        _write_files(staged, step, policy, value_head, optimizer, scheduler, sampler, records)
        published = ckpt.publish(staged, root, step)
    except OSError as exc:
        error = ckpt.write_error(exc, root, ckpt.directory_bytes(staged))
        shutil.rmtree(staging_root, ignore_errors=True)
        raise error from None
    ckpt.rotate(root, keep_last)
    return published


def _write_files(staged: Path, step: int, policy, value_head, optimizer, scheduler, sampler, records) -> None:
    from safetensors.torch import save_file

    if _is_peft(policy):
        policy.save_pretrained(staged)  # adapter_model.safetensors + adapter_config.json, loadable in plain PEFT
    else:
        save_file(_trainable_tensors(policy), str(staged / FULL_WEIGHTS_FILE))
    save_value_head(value_head, staged)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, staged / OPTIMIZER_FILE)
    torch.save(rng_state(sampler.generator), staged / RNG_FILE)
    state = {"global_step": step, "sampler_order": list(sampler.order), "records": records}
    (staged / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")


def load_ppo_checkpoint(checkpoint: Path, policy, value_head, optimizer, scheduler, sampler) -> tuple[int, list[dict]]:
    """Restore everything save_ppo_checkpoint wrote (RNG last, so the next draw is the one the run made next);
    returns (step, records so far)."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    if _is_peft(policy):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(policy, load_file(str(checkpoint / ADAPTER_WEIGHTS_FILE)))
    else:
        _copy_into(policy, load_file(str(checkpoint / FULL_WEIGHTS_FILE)))
    value_head.load_state_dict(load_file(str(checkpoint / VALUE_HEAD_FILE)))
    states = torch.load(checkpoint / OPTIMIZER_FILE, weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    sampler.order = [int(i) for i in state["sampler_order"]]
    restore_rng_state(torch.load(checkpoint / RNG_FILE, weights_only=True), sampler.generator)
    return int(state["global_step"]), state["records"]


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def _trainable_tensors(model) -> dict[str, torch.Tensor]:
    # named_parameters lists a tied weight once, so safetensors sees no shared storage.
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _copy_into(model, tensors: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(parameters))
    if missing:
        raise ValueError(f"checkpoint weights the policy does not have: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


def rng_state(sampler_generator: torch.Generator) -> dict:
    """Every random state a PPO step draws from, as tensors and plain values (loadable with weights_only)."""
    import numpy as np

    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "sampler": sampler_generator.get_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, sampler_generator: torch.Generator) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    sampler_generator.set_state(state["sampler"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """random.setstate wants the tuples getstate gave; a round trip may hand them back as lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
