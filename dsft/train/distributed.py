"""The worker side of multi-process training: which rank this is, rank-0-only writes, and each engine's arguments.

A worker is a process started by torch.distributed.run (dsft train --nproc N, see launch.py): it reads RANK and
WORLD_SIZE from the environment. One process (no launcher) is rank 0 of 1, and every helper here is then a no-op.
The Trainer (through accelerate) shards the data per rank, averages gradients and saves sharded checkpoints; dsft
only keeps its own files (run directory, metrics, sample ledger, final model) to one writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

ENGINE_CONFIG_FILE = "distributed.json"
"""In the run directory: the engine, world size and the accelerate / DeepSpeed settings the run trained with."""
FAIL_RANK_ENV = "DSFT_TEST_FAIL_RANK"
"""Test hook: the worker of this global rank raises right after joining the process group."""
ERROR_DIR_ENV = "DSFT_ERROR_DIR"
"""Set by the launcher: a failing rank writes rank-N.txt with its error there, so the launcher can name it."""


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True on the one process that writes dsft's files (global rank 0, or a single process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op in one process or before the process group exists."""
    import torch.distributed as dist

    if world_size() > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. creates the run directory, trains the tokenizer), then the others do."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def init_worker() -> None:
    """In a worker: join the process group (gloo on CPU, nccl on CUDA) before any file is written, and keep
    ranks > 0 off the console (stdout goes to /dev/null; errors on stderr still show)."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (lives as long as the process)
    if os.environ.get(FAIL_RANK_ENV) == str(rank()):
        # For the tests: a rank that fails after the group formed, while the others wait for it.
        raise RuntimeError(f"failure injected by {FAIL_RANK_ENV}")


def report_failure(message: str) -> None:
    """A failing worker's last act: its error, named by rank, into the launcher's error directory and stderr."""
    line = f"rank {rank()}: {message}"
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir:
        Path(error_dir, f"rank-{rank()}.txt").write_text(line + "\n", encoding="utf-8")
    print(f"error: {line}", file=sys.stderr)


def gather_lists(values: list) -> list:
    """Every rank's list, concatenated in rank order (a collective: every rank must call it)."""
    import torch.distributed as dist

    if world_size() <= 1 or not dist.is_initialized():
        return list(values)
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, list(values))
    return [value for part in gathered for value in part]


def deepspeed_config(engine: str, gradient_clipping: float) -> dict:
    """DeepSpeed's config for zero2, zero3 or zero3_offload; "auto" values are filled by transformers from the
    TrainingArguments (batch sizes, precision, optimizer), so the two never disagree."""
    zero: dict = {"stage": 2 if engine == "zero2" else 3, "overlap_comm": True, "contiguous_gradients": True}
    if engine in ("zero3", "zero3_offload"):
        # One full state dict at save time, so the final model is the same HF format as a single-process run.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if engine == "zero3_offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_clipping": gradient_clipping,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
    }


FSDP2_CONFIG = {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}
"""FSDP2 through transformers' fsdp_config: each decoder layer (the model's _no_split_modules) is one shard unit;
a full state dict is gathered at save time."""


def enable_fsdp_on_cpu(accelerator, plugin_arguments: dict) -> bool:
    """Give a CPU (gloo) worker the FSDP2 engine the Trainer asked for; returns True where it did.

    accelerate turns a requested FSDP plugin into DistributedType.FSDP only for accelerator devices (CUDA, XPU, ...)
    and quietly trains a CPU process as plain DDP. torch's fully_shard itself runs on CPU with gloo, so dsft finishes
    what AcceleratorState would have done on a GPU, for this process only: the FSDP type, the plugin with the run's
    mixed precision, and the shared PartialState type (as accelerate writes it). Everything after that is
    accelerate's own FSDP2 path: fully_shard per decoder layer, sharded optimizer, full state dict on save."""
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if torch.cuda.is_available() or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**plugin_arguments)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def engine_arguments(engine: str, gradient_clipping: float) -> dict:
    """TrainingArguments fields for the engine; none in one process (train.distributed is ignored there).

    fsdp2 on CPU workers: see enable_fsdp_on_cpu."""
    if world_size() <= 1:
        return {}
    if engine == "ddp":
        return {"ddp_find_unused_parameters": False}  # every weight in the graph each step (MoE experts are fused)
    if engine == "fsdp2":
        return {"fsdp": True, "fsdp_config": dict(FSDP2_CONFIG)}
    return {"deepspeed": deepspeed_config(engine, gradient_clipping)}


def gathered_state_dict(trainer) -> dict:
    """A sharded engine's full state dict (a collective: every rank calls it; rank 0 gets the tensors), each weight
    in the dtype a one-process run saves (trainer.model_dtypes).

    Under mixed precision DeepSpeed holds the model in 16 bits (float32 masters live in its optimizer) and FSDP2
    upcasts trained weights to float32, so without this the same float32 run would save bf16 under zero3 and a bf16
    run float32 under fsdp2. A float32 weight DeepSpeed trains comes from its master copy, not from 16 bits."""
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    masters = _fp32_masters(trainer.model, trainer.model_dtypes) if trainer.is_deepspeed_enabled else {}
    if is_main():
        for name, dtype in trainer.model_dtypes.items():
            if name in state_dict:
                state_dict[name] = masters.get(name, state_dict[name]).to(dtype)
    return state_dict


def _fp32_masters(module, model_dtypes: dict) -> dict:
    """DeepSpeed's float32 master of each trained float32 weight, on the CPU (under ZeRO-3 each is gathered from
    every rank, so every rank asks for the same weights in the same order)."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, param in module.named_parameters():
        if param.requires_grad and model_dtypes.get(name) == torch.float32:
            full = safe_get_full_fp32_param(param)
            if full is not None:
                masters[name] = full.detach().cpu()
    return masters


def write_engine_config(run_dir: Path, engine: str, arguments: dict, mixed_precision: str) -> None:
    """distributed.json in the run directory (rank 0): what the launcher and the Trainer were given."""
    if not is_main():
        return
    record = {"engine": engine if world_size() > 1 else "single_process", "world_size": world_size(),
              "mixed_precision": mixed_precision, "training_arguments": arguments}
    (Path(run_dir) / ENGINE_CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def moe_block_classes(model) -> list[type]:
    """Classes of the model's MoE blocks: modules holding both a router (gate) and experts (DeepSeek V2/V3's
    DeepseekV2Moe / DeepseekV3MoE, and the MoE blocks of most HF models)."""
    return sorted({type(m) for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")}, key=str)


def mark_moe_leaves(model, engine: str) -> list[str]:
    """Under ZeRO-3, make each MoE block one leaf for DeepSpeed's parameter fetching: ZeRO-3 otherwise gathers an
    expert's weights only when a token reaches it, and ranks whose tokens pick different experts wait for each
    other forever. Returns the marked class names (none for other engines or a dense model)."""
    classes = moe_block_classes(model)
    if engine not in ("zero3", "zero3_offload") or world_size() <= 1 or not classes:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, classes)
    return [cls.__name__ for cls in classes]
