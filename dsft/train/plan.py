"""dsft plan: per-GPU memory of a run under each distributed engine, before any weight is allocated.

Parameters are counted on the meta device (shapes only, no memory), with the run's method applied, so LoRA targets
and freezing count exactly as in training. Bytes per parameter follow the ZeRO paper (Rajbhandari et al., 2020):
a trained parameter costs 16 bytes under mixed-precision AdamW (2 weight + 2 gradient + 12 optimizer: fp32 master
weight, first and second moment); a frozen one costs its weight only (2 bytes in 16-bit, 4 in float32).

Activations per GPU, in bytes (Korthikanti et al., 2022, "Reducing Activation Recomputation", 16-bit activations,
without the 5*a*s/h attention-score term because sdpa and flash attention never hold the s x s matrix):
  no checkpointing: 34 * b * s * h * L
  gradient checkpointing: 2 * b * s * h * L (each layer's input kept) + 34 * b * s * h (one layer recomputed)
  plus the logits for the loss: 4 * min(b * s, chunk) * V (fp32; chunk = train.loss_chunk_tokens with the chunked
  loss, else every token)
with b = train.batch_size, s = data.max_length_tokens, h = hidden size, L = layers, V = vocabulary. MoE expert
activations, communication buffers, the CUDA context and allocator fragmentation are not counted, which is why only
USABLE_FRACTION of each GPU's memory is planned for.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from dsft.config import RunConfig
from dsft.errors import DsftError

ENGINES = ("ddp", "zero2", "fsdp2", "zero3", "zero3_offload")
"""In the order recommended: the first that fits shards (and communicates) the least."""
USABLE_FRACTION = 0.9
"""Share of a GPU's memory the estimate may fill; the rest is for what the estimate leaves out (see module doc)."""
GIB = 2**30
TRAINED_WEIGHT_BYTES = 2
TRAINED_GRADIENT_BYTES = 2
TRAINED_OPTIMIZER_BYTES = 12
ACTIVATION_BYTES_PER_LAYER_TOKEN_HIDDEN = 34
CHECKPOINTED_BYTES_PER_LAYER_TOKEN_HIDDEN = 2
LOGIT_BYTES = 4


@dataclass(frozen=True)
class StateBytes:
    """Bytes of the whole (unsharded) model's training state."""

    weights: int
    gradients: int
    optimizer: int


@dataclass(frozen=True)
class EngineEstimate:
    """Per-GPU bytes of one engine; cpu_bytes is what one rank keeps in CPU memory instead (zero3_offload)."""

    engine: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    cpu_bytes: int

    @property
    def gpu_bytes(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass(frozen=True)
class Plan:
    total_parameters: int
    trainable_parameters: int
    gpus: int
    gpu_memory_gib: float
    estimates: list[EngineEstimate]
    recommended: str | None
    configured: str
    model: str = ""
    """Where the model's shape came from: a preset, a config.json, or a published shape (dsft/models/shapes.py)."""
    method: str = ""
    """What the method trains and what its frozen weights hold in memory."""

    def fits(self, estimate: EngineEstimate) -> bool:
        return estimate.gpu_bytes <= self.gpu_memory_gib * GIB * USABLE_FRACTION

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for entry, estimate in zip(data["estimates"], self.estimates, strict=True):
            entry.update(gpu_bytes=estimate.gpu_bytes, fits=self.fits(estimate))
        return data


def state_bytes(total_parameters: int, trainable_parameters: int, frozen_weight_bytes: float) -> StateBytes:
    """16 bytes per trained parameter (2 + 2 + 12), frozen_weight_bytes per frozen one (weights only; a fraction for
    a quantized base)."""
    frozen = total_parameters - trainable_parameters
    return StateBytes(
        weights=TRAINED_WEIGHT_BYTES * trainable_parameters + int(frozen_weight_bytes * frozen),
        gradients=TRAINED_GRADIENT_BYTES * trainable_parameters,
        optimizer=TRAINED_OPTIMIZER_BYTES * trainable_parameters,
    )


def activation_bytes(batch_size: int, max_length_tokens: int, hidden_size: int, num_layers: int, vocab_size: int,
                     gradient_checkpointing: bool, loss_chunk_tokens: int | None) -> int:
    """Activation bytes of one GPU's micro-batch by the module doc's formula; loss_chunk_tokens None: no chunked loss."""
    tokens = batch_size * max_length_tokens
    per_layer = ACTIVATION_BYTES_PER_LAYER_TOKEN_HIDDEN * tokens * hidden_size
    if gradient_checkpointing:
        layers = CHECKPOINTED_BYTES_PER_LAYER_TOKEN_HIDDEN * tokens * hidden_size * num_layers + per_layer
    else:
        layers = per_layer * num_layers
    logit_tokens = tokens if loss_chunk_tokens is None else min(tokens, loss_chunk_tokens)
    return layers + LOGIT_BYTES * logit_tokens * vocab_size


def _shard(value: int, gpus: int) -> int:
    return -(-value // gpus)


def engine_estimate(engine: str, states: StateBytes, activations: int, gpus: int) -> EngineEstimate:
    """Per-GPU bytes: ddp replicates all; zero2 shards gradients and optimizer; zero3 and fsdp2 shard all three;
    zero3_offload shards gradients on the GPU and moves the weight and optimizer shards to CPU memory.

    Raises DsftError for an unknown engine."""
    weights, gradients, optimizer = states.weights, states.gradients, states.optimizer
    if engine == "ddp":
        return EngineEstimate(engine, weights, gradients, optimizer, activations, 0)
    if engine == "zero2":
        return EngineEstimate(engine, weights, _shard(gradients, gpus), _shard(optimizer, gpus), activations, 0)
    if engine in ("zero3", "fsdp2"):
        sharded = (_shard(weights, gpus), _shard(gradients, gpus), _shard(optimizer, gpus))
        return EngineEstimate(engine, *sharded, activations, 0)
    if engine == "zero3_offload":
        cpu_bytes = _shard(weights, gpus) + _shard(optimizer, gpus)
        return EngineEstimate(engine, 0, _shard(gradients, gpus), 0, activations, cpu_bytes)
    raise DsftError(f"train.distributed: unknown engine {engine!r}; allowed: {', '.join(ENGINES)}")


def make_plan(total_parameters: int, trainable_parameters: int, frozen_weight_bytes: float, activations: int,
              gpus: int, gpu_memory_gib: float, configured: str = "ddp", zero3_activations: int | None = None) -> Plan:
    """Every engine's estimate and the first of ENGINES that fits (None when none does). zero3_activations: the
    activations of zero3 and zero3_offload on several GPUs when they differ (the chunked loss does not run there, so
    the full logits count)."""
    if gpus < 1 or gpu_memory_gib <= 0:
        raise DsftError(f"dsft plan: --gpus must be >= 1 and --gpu-memory > 0 (got {gpus} and {gpu_memory_gib})")
    states = state_bytes(total_parameters, trainable_parameters, frozen_weight_bytes)

    def activations_of(engine: str) -> int:
        unchunked = zero3_activations is not None and gpus > 1 and engine in ("zero3", "zero3_offload")
        return zero3_activations if unchunked else activations

    estimates = [engine_estimate(engine, states, activations_of(engine), gpus) for engine in ENGINES]
    plan = Plan(total_parameters, trainable_parameters, gpus, gpu_memory_gib, estimates, None, configured)
    recommended = next((e.engine for e in estimates if plan.fits(e)), None)
    return dataclasses.replace(plan, recommended=recommended)


def model_shape(config: RunConfig):
    """(the transformers config of the run's model, where it came from): a preset's, config.json of
    model.name_or_path (no weights), or, where that cannot be read (offline, no hub access), the published shape of
    a known hub id (dsft/models/shapes.py)."""
    model = config.model
    if model.preset is not None:
        from dsft.models.presets import preset_config

        return preset_config(model.preset, model.tokenizer_vocab_size, 1, 2, 0), f"preset {model.preset}"
    from transformers import AutoConfig

    from dsft.models.load import hub_token
    from dsft.models.shapes import HUB_IDS, published_shape, shape_config

    try:
        shape = AutoConfig.from_pretrained(model.name_or_path, revision=model.revision, token=hub_token(model),
                                           trust_remote_code=model.trust_remote_code)
        return shape, f"{model.name_or_path} config.json"
    except (OSError, ValueError) as exc:
        published = published_shape(model.name_or_path)
        if published is None:
            raise DsftError(f"model.name_or_path: cannot read the model config of {model.name_or_path}: {exc}; "
                            f"the published shapes dsft knows without it: {', '.join(HUB_IDS)}") from None
        name = HUB_IDS.get(model.name_or_path, model.name_or_path)
        return shape_config(published), f"published shape {name} (its config.json could not be read)"


def count_on_meta(shape, config: RunConfig):
    """(ParamCounts, bytes of the frozen weights as the run holds them) of the model with the run's method applied,
    built on the meta device (no memory)."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from dsft.models.method import apply_method, count_parameters
    from dsft.models.quantize import frozen_weight_bytes

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on unmatched patterns say nothing about memory
        model = AutoModelForCausalLM.from_config(shape, trust_remote_code=config.model.trust_remote_code)
        model = apply_method(model, config.method)
    dtype_bytes = 4 if config.model.dtype == "float32" else 2
    return count_parameters(model), frozen_weight_bytes(model, config.method, dtype_bytes)


def plan_run(config: RunConfig, gpus: int, gpu_memory_gib: float) -> Plan:
    """The plan of a run config on gpus GPUs of gpu_memory_gib each. Raises DsftError on an unreadable model."""
    shape, source = model_shape(config)
    counts, frozen_bytes = count_on_meta(shape, config)
    text = shape.get_text_config() if hasattr(shape, "get_text_config") else shape
    train = config.train
    chunk = None if train.chunked_loss == "off" else train.loss_chunk_tokens  # auto: on CUDA, where plans matter

    def activations(chunk_tokens: int | None) -> int:
        return activation_bytes(train.batch_size, config.data.max_length_tokens, text.hidden_size,
                                text.num_hidden_layers, text.vocab_size, train.gradient_checkpointing, chunk_tokens)

    frozen = counts.total - counts.trainable
    # Bytes per frozen parameter on average: a quantized base holds most of them in about half a byte.
    per_frozen = frozen_bytes / frozen if frozen else 2
    plan = make_plan(counts.total, counts.trainable, per_frozen, activations(chunk), gpus, gpu_memory_gib,
                     train.distributed, zero3_activations=activations(None) if chunk is not None else None)
    return dataclasses.replace(plan, model=source, method=_method_line(config, counts, frozen_bytes))


def _method_line(config: RunConfig, counts, frozen_bytes: int) -> str:
    """What the method trains and holds: e.g. "qlora (nf4, double quantization): trains 1.2% ... frozen 3.9 GiB"."""
    method = config.method
    name = method.type
    if method.type == "qlora":
        q = method.qlora
        name += f" ({q.bits}-bit" + (f" {q.quant_type}{', double quantization' if q.double_quant else ''})"
                                     if q.bits == 4 else ")")
    share = counts.trainable / counts.total if counts.total else 0.0
    return (f"{name}: trains {counts.trainable:,} parameters ({share:.2%}), holds the "
            f"{counts.total - counts.trainable:,} frozen ones in {_size(frozen_bytes)}")


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.2f} MiB"


def print_plan(plan: Plan, as_json: bool) -> None:
    """The plan as a rich table with the recommendation, or as JSON (as_json)."""
    if as_json:
        print(json.dumps(plan.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"model: {plan.model}")
    console.print(f"parameters: {plan.total_parameters:,} total, {plan.trainable_parameters:,} trained; "
                  f"{plan.gpus} GPU(s) of {plan.gpu_memory_gib:g} GiB ({USABLE_FRACTION:.0%} planned)")
    if plan.method:
        console.print(f"method {plan.method}")
    table = Table("engine", "weights", "gradients", "optimizer", "activations", "per GPU", "CPU per rank", "fits",
                  title="per-GPU memory, GiB")
    for e in plan.estimates:
        cells = [e.weights, e.gradients, e.optimizer, e.activations, e.gpu_bytes, e.cpu_bytes]
        table.add_row(e.engine, *(f"{value / GIB:.2f}" for value in cells), "yes" if plan.fits(e) else "no")
    console.print(table)
    console.print(_advice(plan))


def _advice(plan: Plan) -> str:
    if plan.recommended is None:
        return ("recommended: none fits; lower train.batch_size or data.max_length_tokens, set "
                "train.gradient_checkpointing: true, use method.type: lora, or add GPUs")
    line = f"recommended: train.distributed: {plan.recommended}"
    configured = next(e for e in plan.estimates if e.engine == plan.configured)
    if not plan.fits(configured):
        line += f" (the configured {plan.configured} does not fit)"
    return line
