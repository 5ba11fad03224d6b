"""Tokenizers: load the model's own, or train a byte-level BPE for a preset model.

A trained tokenizer carries the DeepSeek chat special tokens, so the built-in DeepSeek chat
templates render exactly as they would with a real DeepSeek tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Special tokens are never split or produced by BPE merges; the think tags and tool markers are
# ordinary added tokens (as in DeepSeek's tokenizers) so they survive decode with skip_special_tokens.
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOL_TOKENS = [CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, TOOL_SEP, OUTPUTS_BEGIN, OUTPUTS_END, OUTPUT_BEGIN,
               OUTPUT_END]
"""DeepSeek's tool-calling markers (dsft/data/deepseek_layouts.py writes them)."""
ADDED_TOKENS = [THINK_OPEN, THINK_CLOSE, *TOOL_TOKENS]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE (digits split one by one, as DeepSeek's does) on texts.

    Returns a transformers fast tokenizer with bos, eos and pad set to the DeepSeek tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tokenizer.add_tokens(ADDED_TOKENS)
    return tokenizer


def load_tokenizer(
    name_or_path: str | Path, trust_remote_code: bool = False, revision: str | None = None, token: str | None = None
):
    """Load a tokenizer from a local directory or hub id; gives it a pad token if it has none.

    token is a Hugging Face token for private or gated repositories (None: huggingface_hub's own login).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(name_or_path), trust_remote_code=trust_remote_code, revision=revision, token=token
    )
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing eos is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
