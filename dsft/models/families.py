"""What dsft does differently for the DeepSeek architectures whose layers are not plain attention and MLP.

DeepSeek-V3.2 (deepseek_v32) adds DeepSeek sparse attention: a lightning indexer (wq_b, wk, weights_proj) scores
the keys and each query attends to its index_topk best. DeepSeek-V4 (deepseek_v4) compresses the sequence:
compressors pool every compress_rate consecutive tokens into one KV entry (kv_proj, gate_proj and a position bias),
an indexer picks compressed entries, a sliding window covers the recent tokens, the output projection is grouped
(o_a_proj, one block per head group, then o_b_proj mixes the groups), the residual stream is hc_mult streams mixed
by hyper-connections (fn, base, scale parameters), and the first MoE layers route by a frozen token-to-expert table
(tid2eid, a buffer) instead of the router's top-k.

Choices, and why:
- LoRA all-linear leaves out every indexer projection. transformers runs the indexers under torch.no_grad and their
  scores reach the loss only through a top-k choice, so the language-model loss gives them no gradient: an adapter
  there would stay at zero. (DeepSeek trains the indexer by distilling the dense attention, a loss dsft does not
  have.) Full and freeze fine-tuning leave their weights unchanged for the same reason.
- LoRA all-linear leaves out V4's grouped output projection o_a_proj: it is a block-diagonal nn.Linear (one block
  per head group) whose input is per group, which PEFT's linear LoRA would treat as one dense projection of the
  wrong shape. Its partner o_b_proj, which mixes the groups into the hidden size, is adapted.
- V4's compressors (kv_proj, gate_proj) are adapted: they are linear maps of the hidden states whose outputs the
  attention reads, and they get the loss's gradient.
- Hyper-connection mappings are parameters, not linear layers: LoRA leaves them as they are; full fine-tuning
  trains them.
- V4's routed experts are fused 3D tensors that PEFT's MoE conversion does not know for deepseek_v4 (it does for
  V2, V3 and V3.2), so all-linear adapts them by target_parameters, rank r each (V3's gate_up gets 2r from PEFT's
  conversion, r for gate and r for up); dsft's grouped-GEMM expert LoRA then computes them as it does for V3.
- V4 never sees a padding token: left padding would enter the compressors' windows (models/unpadded.py runs each
  row of a padded batch alone, and generates prompts of one length together).
- The token-to-expert table is a buffer: no method trains it, every checkpoint and merge carries it.
- Packing is refused for V4: a compressor pools consecutive tokens of a row whatever sample they belong to, so a
  packed row would mix samples in one KV entry. V3.2 packs, in SFT and in the padded stages' packed body: its indexer
  scores under the attention mask, so the block-diagonal mask of packed rows keeps it inside each sample (a packed
  sample's outputs do not move when another sample changes, tests/unit/test_packed_forward.py), but only with the
  mask, never a varlen kernel, which has no place for the indexer's choice. Packed equals padded exactly where the
  indexer keeps every key a query sees (samples up to index_topk tokens: 2048 in V3.2); beyond that, keys with equal
  index scores (its ReLU gives exact zeros) are chosen by their place in the row, which packing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsft.errors import DsftError


@dataclass(frozen=True)
class Family:
    """The per-architecture facts dsft acts on; the default is a plain decoder."""

    lora_exclude: str | None = None
    """Regex (PEFT exclude_modules) of the linear modules all-linear leaves out."""
    expert_parameters: tuple[str, ...] = ()
    """Fused expert tensors all-linear adapts through PEFT's target_parameters."""
    packing_blocker: str | None = None
    """Why train.packing cannot apply; None where it can."""
    varlen_blocker: str | None = None
    """Why packed rows keep the block-diagonal mask instead of a varlen attention kernel; None where a kernel may run."""
    padding_blocker: str | None = None
    """Why the model must never see a padding token (models/unpadded.py then runs each row alone); None where the
    attention mask hides padding."""


_INDEXER = r".*\.indexer\..*"
_V32 = Family(
    lora_exclude=_INDEXER,
    varlen_blocker="DeepSeek sparse attention's indexer needs the attention mask",
)
_V4 = Family(
    lora_exclude=rf"({_INDEXER}|.*\.o_a_proj)",
    expert_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    packing_blocker=("DeepSeek-V4's compressors pool consecutive tokens of a row into one KV entry whatever sample "
                     "they belong to, so packed samples would see each other"),
    varlen_blocker="DeepSeek-V4's attention has sinks and compressed entries",
    padding_blocker="DeepSeek-V4's compressors pool a row's tokens from its first position, pads included",
)
FAMILIES = {"deepseek_v32": _V32, "deepseek_v4": _V4}


def family_of(model_type: str | None) -> Family:
    """The Family of a transformers model_type (a plain decoder's for every other type)."""
    return FAMILIES.get(model_type or "", Family())


def model_type_of(model) -> str | None:
    """config.model_type of a model, PEFT-wrapped or not; None when it has no config."""
    config = getattr(getattr(model, "backbone", model), "config", None)  # a multitask model's is its backbone's
    return getattr(config, "model_type", None)


def refuse_packing(model, packing: bool) -> None:
    """Raise DsftError naming train.packing when it is on for a model whose architecture cannot pack."""
    blocker = family_of(model_type_of(model)).packing_blocker
    if packing and blocker is not None:
        raise DsftError(f"train.packing: not available for {model_type_of(model)}: {blocker}; set train.packing: false")


def linear_module_names(model) -> set[str]:
    """Short names of the model's linear layers (what LoRA target_modules may name)."""
    import torch

    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
