"""What the PEFT menu needs once the trainer holds the wrapped model, for every stage alike:
- adapter_precision: a qlora adapter in bfloat16 under bf16 mixed precision, else float32;
- initialise_adapter: method.lora.init loftq (A and B fitted to the 4-bit base's quantization error, PEFT's
  replace_lora_weights_loftq, reading the base's own safetensors), and for pissa and olora the adapter as
  initialised saved in the run directory, so the final save converts it to plain LoRA on the original base
  (PEFT's path_initial_model_for_weight_conversion): merge, export and every loader then see an ordinary adapter;
- loraplus_optimizer: LoRA+ (method.lora.plus_lr_ratio), PEFT's create_loraplus_optimizer with the optimizer class
  and settings the Trainer would have used.
"""

from __future__ import annotations

from pathlib import Path

from dsft.config import RunConfig
from dsft.errors import DsftError
from dsft.train.distributed import is_main

INITIAL_ADAPTER_DIR = "initial_adapter"
"""In a pissa or olora run directory: the adapter before training, which the final save converts against."""
MUTATED_INITS = ("pissa", "olora")
"""method.lora.init values that move part of the base weight into the adapter."""


def adapter_precision(trainer, config: RunConfig) -> None:
    """A qlora adapter trains in bfloat16 under bf16 mixed precision (the QLoRA paper's recipe, which TRL's trainers
    apply to every quantized model) and in float32 otherwise, in every stage alike: TRL's cast to bfloat16 would meet
    float32 activations where no autocast runs (fp32 and fp16 runs, the CPU). DoRA's magnitude vector stays float32
    (its small updates would round away in bfloat16)."""
    import torch

    if config.method.type != "qlora":
        return
    dtype = torch.bfloat16 if trainer.args.bf16 else torch.float32
    for name, parameter in trainer.model.named_parameters():
        if parameter.requires_grad and parameter.dtype != dtype and "lora_magnitude_vector" not in name:
            parameter.data = parameter.data.to(dtype)


def initialise_adapter(model, config: RunConfig, run_dir: Path) -> None:
    """LoftQ's fit, or the saved initial adapter of pissa and olora (see the module docstring); nothing otherwise."""
    if not config.method.lora_family:
        return
    init = config.method.lora.init
    if init == "loftq":
        _loftq(model)
    elif init in MUTATED_INITS and is_main() and not (run_dir / INITIAL_ADAPTER_DIR).exists():
        # A resumed run re-initialises the same way (the SVD or QR of the same base) and keeps the first one.
        model.save_pretrained(run_dir / INITIAL_ADAPTER_DIR, safe_serialization=True)


def _loftq(model) -> None:
    import torch
    from peft import replace_lora_weights_loftq

    if not torch.cuda.is_available():
        raise DsftError("method.lora.init loftq needs CUDA: PEFT's LoftQ fit (replace_lora_weights_loftq) runs on "
                        "the GPU; on the CPU use init default with qlora")

    base = model.get_base_model()
    source = Path(getattr(base.config, "_name_or_path", "") or "")
    if not source.is_dir():
        raise DsftError(f"method.lora.init loftq reads the base's 16-bit weights from a local safetensors copy; "
                        f"{source} is not a local directory (download the model and point model.name_or_path at it)")
    try:
        replace_lora_weights_loftq(model, model_path=str(source))
    except (ValueError, FileNotFoundError) as exc:
        raise DsftError(f"method.lora.init loftq: {str(exc).splitlines()[0]}") from None


def conversion_kwargs(config: RunConfig, run_dir: Path) -> dict:
    """save_pretrained arguments that convert a pissa or olora adapter to plain LoRA on the original base."""
    if not (config.method.lora_family and config.method.lora.init in MUTATED_INITS):
        return {}
    return {"path_initial_model_for_weight_conversion": str(run_dir / INITIAL_ADAPTER_DIR)}


def loraplus_optimizer(trainer, ratio: float):
    """LoRA+'s optimizer for trainer.model: the B matrices at ratio x the learning rate, the rest as the Trainer's."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    kwargs = {key: value for key, value in kwargs.items() if key != "lr"}
    return create_loraplus_optimizer(trainer.model, optimizer_cls, lr=trainer.args.learning_rate,
                                     loraplus_lr_ratio=ratio, weight_decay=trainer.args.weight_decay, **kwargs)
