"""A bounded least-recently-used cache of replies to deterministic (greedy) requests.

Only greedy requests are cached: a sampled reply is one draw, and answering it again would hide that. The key holds
everything that decides a greedy reply: the served model, the prompt's token ids, max_tokens and the stop strings.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class CachedReply:
    text: str
    finish_reason: str
    completion_tokens: int


class ReplyCache:
    """At most max_entries replies; max_entries 0 holds none (every lookup misses and nothing is stored)."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, CachedReply] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(model: str, prompt_ids: list[int], max_tokens: int, stop: list[str]) -> tuple:
        return model, tuple(prompt_ids), max_tokens, tuple(stop)

    def get(self, key: tuple) -> CachedReply | None:
        with self._lock:
            reply = self._entries.get(key)
            if reply is not None:
                self._entries.move_to_end(key)
            return reply

    def put(self, key: tuple, reply: CachedReply) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            self._entries[key] = reply
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
