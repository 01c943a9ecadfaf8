"""A mapping bounded by the bytes its values hold, least recently used out first: the store under the encoder cache
and the URL cache."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteBoundedLRU(Generic[V]):
    """Values with the byte size they were put with; `bytes` (their sum) never exceeds `max_bytes`. Reading with
    `get` makes a value the most recently used; `peek` does not."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def peek(self, key: str) -> V | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, value: V, size: int) -> int:
        """Keeps `value` (in place of what `key` held), evicting the least recently used until the rest fits; a
        value larger than `max_bytes` is not kept (and `key` is then empty). Returns how many entries were evicted."""
        self.pop(key)
        if size > self.max_bytes:
            return 0
        self._entries[key] = (value, size)
        self.bytes += size
        evicted = 0
        while self.bytes > self.max_bytes:  # never the new entry: it fits alone
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self.bytes -= evicted_size
            evicted += 1
        return evicted

    def pop(self, key: str) -> V | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.bytes -= entry[1]
        return entry[0]
