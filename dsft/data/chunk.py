"""Split long texts into overlapping windows of tokens (the `chunk` step).

Chunks are cut from the original text at token offsets, never decoded from ids, so a chunk is
always an exact substring of the input (no decode artifacts, spaces or bytes kept as written).
"""

from __future__ import annotations


def chunk_text(text: str, tokenizer, max_tokens: int, stride_tokens: int) -> list[str]:
    """Windows of at most max_tokens tokens of text, one starting every stride_tokens tokens,
    until a window reaches the last token; consecutive windows share max_tokens - stride_tokens tokens.

    Each chunk is text from its first token's start offset to its last token's end offset. Text of
    at most max_tokens tokens comes back whole, as [text]. tokenizer is a fast transformers
    tokenizer (offsets are needed); None counts characters instead of tokens.
    Raises ValueError when max_tokens or stride_tokens is below 1 or stride_tokens exceeds max_tokens
    (ChunkStep's validation reports these to users first).
    """
    if max_tokens < 1 or not 1 <= stride_tokens <= max_tokens:
        raise ValueError(f"need 1 <= stride_tokens ({stride_tokens}) <= max_tokens ({max_tokens})")
    offsets = _token_offsets(text, tokenizer)
    if len(offsets) <= max_tokens:
        return [text]
    chunks = []
    for start_token in range(0, len(offsets), stride_tokens):
        end_token = min(start_token + max_tokens, len(offsets))
        chunks.append(text[offsets[start_token][0]:offsets[end_token - 1][1]])
        if end_token == len(offsets):
            break
    return chunks


def _token_offsets(text: str, tokenizer) -> list[tuple[int, int]]:
    """(start, end) character offsets of each token of text; one per character without a tokenizer."""
    if tokenizer is None:
        return [(i, i + 1) for i in range(len(text))]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [tuple(pair) for pair in encoding["offset_mapping"]]
