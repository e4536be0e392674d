"""The bf16 tails of cached histories: the part of a finished request past its last whole page.

A request's newest < 128 tokens live in its residual page (`oscar_kv.sglang.pool`), never in
a packed page, so the radix tree of whole pages cannot hold them. When a request finishes,
its residual page becomes a tail: (the tree node where its whole pages end, the tail's token
ids, the residual page). The next request whose key continues past that node by tokens a
tail starts with takes those tokens as cached prefix too, so a chat's next turn reuses its
whole history. The adopting request gets a copy of the page (copy-on-write: several requests
may continue one tail differently), or, when residual pages run out, the page itself.

`TailStore` is the bookkeeping only (groups per node, longest-common-prefix lookup, LRU
order); page ownership moves through the pool, and the tree node of each group is checked
by the prefix cache, which drops the tails of nodes the tree evicted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class Tail:
    """One cached tail. ``group`` is (tree node handle, namespace key)."""

    group: tuple[int, str | None]
    tokens: tuple[int, ...]
    page: int
    last_used: int = 0
    alive: bool = field(default=True)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class TailStore:
    """Tails grouped by the node they hang from; see the module docstring."""

    def __init__(self) -> None:
        self._groups: dict[tuple[int, str | None], list[Tail]] = {}
        # Every cached tail by id(), least recently used first (a use moves it to the end):
        # the LRU walk and the count need no pass over all groups.
        self._order: dict[int, Tail] = {}
        self._clock = 0

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[Tail]:
        for group in self._groups.values():
            yield from group

    def groups(self) -> list[tuple[int, str | None]]:
        return list(self._groups)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _forget(self, tail: Tail) -> None:
        tail.alive = False
        del self._order[id(tail)]

    def _used(self, tail: Tail) -> None:
        tail.last_used = self._tick()
        self._order[id(tail)] = self._order.pop(id(tail))

    def match(self, group: tuple[int, str | None], rest: Sequence[int]) -> tuple[Tail | None, int]:
        """The tail of ``group`` sharing the longest prefix with ``rest`` (the key past the
        node), and that length; stamps it as used."""
        best, best_len = None, 0
        for tail in self._groups.get(group, ()):
            k = common_prefix(tail.tokens, rest)
            if k > best_len:
                best, best_len = tail, k
        if best is not None:
            self._used(best)
        return best, best_len

    def add(self, group: tuple[int, str | None], tokens: Sequence[int], page: int) -> list[int]:
        """Adds a tail; returns the residual pages it made redundant (the new tail itself
        when a cached one already starts with its tokens, or cached tails that are prefixes
        of it), for the caller to give back."""
        tokens = tuple(tokens)
        members = self._groups.setdefault(group, [])
        for tail in members:
            if tail.tokens[: len(tokens)] == tokens:
                self._used(tail)
                return [page]
        freed = [t.page for t in members if tokens[: len(t.tokens)] == t.tokens]
        kept = [t for t in members if tokens[: len(t.tokens)] != t.tokens]
        for tail in members:
            if tail not in kept:
                self._forget(tail)
        new = Tail(group, tokens, page, self._tick())
        kept.append(new)
        self._order[id(new)] = new
        self._groups[group] = kept
        return freed

    def remove(self, tail: Tail) -> None:
        members = self._groups.get(tail.group)
        if not tail.alive or members is None:
            raise ValueError("tail is not cached")
        members.remove(tail)
        self._forget(tail)
        if not members:
            del self._groups[tail.group]

    def drop_groups(self, groups: Iterable[tuple[int, str | None]]) -> list[int]:
        """Removes every tail of the given groups; returns their pages."""
        pages = []
        for group in groups:
            for tail in self._groups.pop(group, ()):
                self._forget(tail)
                pages.append(tail.page)
        return pages

    def lru(self, n: int, protect: set[int]) -> list[Tail]:
        """Up to n least recently used tails whose id() is not in ``protect``."""
        out: list[Tail] = []
        for key, tail in self._order.items():
            if len(out) == n:
                break
            if key not in protect:
                out.append(tail)
        return out

    def clear(self) -> list[int]:
        return self.drop_groups(list(self._groups))
