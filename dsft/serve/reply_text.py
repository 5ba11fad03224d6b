"""A reply's text as its tokens arrive: incremental decoding, stop strings, and the reasoning/answer split.

Streamed and whole replies go through the same ReplyText, so a stream's pieces join to the whole reply's text.
"""

from __future__ import annotations

from dsft.data.tokenizer import THINK_CLOSE, THINK_OPEN

_INCOMPLETE = "\ufffd"
"""What decode gives for the first bytes of a multi-byte character split across tokens: held until complete."""


class ReplyText:
    """Decoded text of generated token ids, released as it becomes final.

    Text is held back while it ends in an incomplete character or could be the start of a stop string; when a stop
    string appears the text ends before it and `stopped` turns true (the caller cancels the generation).
    """

    def __init__(self, tokenizer, stop: list[str]):
        self._tokenizer, self._stop = tokenizer, stop
        self.token_ids: list[int] = []
        self.text = ""
        """Text released so far."""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Take one generated token; returns the newly released text (often "")."""
        return self.extend([token_id])

    def extend(self, token_ids: list[int]) -> str:
        """Take generated tokens; returns the newly released text (often "")."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        decoded = self._tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._stop_at(decoded)  # first: the tokens that complete a stop string may also begin a character
        if cut is not None:
            self.stopped = True
            return self._release(decoded[:cut])
        if decoded.endswith(_INCOMPLETE):
            return ""
        return self._release(decoded[: len(decoded) - self._held_back(decoded)])

    def finish(self) -> str:
        """The generation ended: release what was held back (an incomplete character is dropped)."""
        if self.stopped or not self.token_ids:
            return ""
        decoded = self._tokenizer.decode(self.token_ids, skip_special_tokens=True).rstrip(_INCOMPLETE)
        return self._release(decoded)

    def _release(self, text: str) -> str:
        # Decoding more tokens can change earlier characters only within an incomplete one, which was held back.
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text if text.startswith(self.text) else self.text
        return delta

    def _stop_at(self, decoded: str) -> int | None:
        longest = max((len(s) for s in self._stop), default=0)
        start = max(0, len(self.text) - longest)
        found = [i for i in (decoded.find(s, start) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self, decoded: str) -> int:
        """Length of the longest end of decoded that begins a stop string."""
        for size in range(min(len(decoded), max((len(s) - 1 for s in self._stop), default=0)), 0, -1):
            if any(s.startswith(decoded[-size:]) for s in self._stop):
                return size
        return 0


class ReasoningStream:
    """Split streamed reply text into reasoning and answer pieces, as DeepSeek's API streams reasoning_content.

    A prompt that ends by opening a think block (deepseek_r1) starts in reasoning; otherwise a reply that begins with
    <think> does. Reasoning ends at </think>. A </think> in a reply that did not begin in reasoning is answer text:
    a stream cannot take back what it already sent as content (split_reply follows these rules too, so a plain reply
    carries what its stream would). Whitespace at the start of each part is dropped, as split_reasoning strips it.
    """

    def __init__(self, prompt_opens_thinking: bool):
        self._state = "reasoning" if prompt_opens_thinking else "undecided"
        self.reasoned = prompt_opens_thinking
        """Whether the reply is (or began) in reasoning."""
        self._pending = ""
        self._started = {"reasoning": False, "answer": False}

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning piece, answer piece) of the next released text; either may be ""."""
        self._pending += text
        reasoning, answer = "", ""
        if self._state == "undecided":
            stripped = self._pending.lstrip()
            if len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped):
                return "", ""  # could still become <think>
            self._state = "reasoning" if stripped.startswith(THINK_OPEN) else "answer"
            self.reasoned = self._state == "reasoning"
            self._pending = stripped[len(THINK_OPEN):] if self._state == "reasoning" else self._pending
        if self._state == "reasoning":
            head, found, tail = self._pending.partition(THINK_CLOSE)
            if not found:
                keep = _marker_prefix_length(head, THINK_CLOSE)
                reasoning, self._pending = head[: len(head) - keep], head[len(head) - keep:]
                return self._part("reasoning", reasoning), ""
            reasoning, self._pending, self._state = head, tail, "answer"
        answer, self._pending = self._pending, ""
        return self._part("reasoning", reasoning), self._part("answer", answer)

    def finish(self) -> tuple[str, str]:
        """Pieces still held at the end of the reply (a partial marker is text after all)."""
        pending, self._pending = self._pending, ""
        if self._state == "reasoning":
            return self._part("reasoning", pending), ""
        return "", self._part("answer", pending)

    def _part(self, which: str, text: str) -> str:
        if not self._started[which]:
            text = text.lstrip()
            self._started[which] = bool(text)
        return text


def _marker_prefix_length(text: str, marker: str) -> int:
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def prompt_opens_thinking(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside an opened think block (the model's reply starts with reasoning)."""
    return prompt_text.rstrip().endswith(THINK_OPEN)


def split_reply(text: str, opens_thinking: bool) -> tuple[str | None, str]:
    """(reasoning, answer) of a whole reply, split by the rules a stream of it is split by (ReasoningStream), so a
    streamed and a plain reply carry the same fields; reasoning is None when the reply did not reason."""
    splitter = ReasoningStream(opens_thinking)
    parts = [splitter.feed(text), splitter.finish()]
    reasoning, answer = ("".join(part[i] for part in parts).rstrip() for i in (0, 1))
    return (reasoning if splitter.reasoned else None), answer
