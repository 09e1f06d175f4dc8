"""A radix tree over token ids at page granularity: requests with a common prefix share KV pages.

Each edge holds whole pages (its key length is a multiple of page_size). The tree holds one
reference on every page it stores; leaves whose pages nobody else references are evicted LRU-first.
A match that ends inside an edge splits it there, so the unmatched tail stays evictable while the
matched head is in use.

Eviction runs when the pool is full, often every step, while the tree may hold thousands of finished
sequences' leaves: it pops a heap of leaves kept across calls (an entry per leaf access; entries that went
stale are skipped as they come up, and the heap is rebuilt when they outnumber the leaves) instead of walking
the whole tree each time. Whether a leaf may go is decided when it comes up, from the page refcounts then. A
leaf still in use then (a running sequence's prompt, a prefix running sequences matched) is parked outside the
heap until the allocator reports one of its pages released down to the cache's own reference, so calls under KV
pressure, when most leaves are in use and the batcher asks once per row, do not pop the same leaves again.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from hotswap.cache.page_allocator import PageAllocator

_clock = itertools.count(1)  # 0 is a new node's last_access: never a time


@dataclass(eq=False, slots=True)
class _Node:
    key: tuple[int, ...] = ()
    pages: list[int] = field(default_factory=list)
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)  # first page of tokens -> child
    parent: _Node | None = None
    last_access: int = 0
    removed: bool = False  # evicted, or dropped by reset: its heap entries are stale


class RadixPrefixCache:
    def __init__(self, allocator: PageAllocator):
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.root = _Node()
        # (last_access, tie, node) for leaves; stale when the node was touched since, gained children or was removed
        self._lru: list[tuple[int, int, _Node]] = []
        self._num_leaves = 0
        self._parked: dict[int, _Node] = {}  # page -> the leaf found in use that holds it
        allocator.unshared = set()

    def _touched(self, node: _Node, now: int) -> None:
        """`node` was used at `now`: a leaf gets an entry at its new time (its older entries go stale)."""
        if node.last_access == now:  # touched already in this call
            return
        node.last_access = now
        if not node.children and node is not self.root:
            self._push(node)

    def _push(self, leaf: _Node) -> None:
        heapq.heappush(self._lru, (leaf.last_access, next(_clock), leaf))
        if len(self._lru) > 4 * self._num_leaves + 1024:  # mostly stale entries: start over from the leaves
            self._lru = [(n.last_access, next(_clock), n) for n in self._leaves()]
            heapq.heapify(self._lru)

    def match(self, tokens: list[int]) -> list[int]:
        """Pages caching the longest page-aligned prefix of `tokens`; the caller retains them."""
        ps = self.page_size
        node, pages, now = self.root, [], next(_clock)
        full, i = len(tokens) // ps, 0
        while i < full:
            child = node.children.get(tuple(tokens[i * ps : (i + 1) * ps]))
            if child is None:
                break
            n = len(child.pages)
            common = self._common_pages(child, tokens, i)
            if common < n:  # ends inside this edge: split so the tail can still be evicted
                self._split(child, common)
            pages.extend(child.pages)
            self._touched(child, now)
            if common < n:
                break
            node, i = child, i + n
        while node is not self.root:  # refresh ancestors so LRU never evicts under a hot leaf
            self._touched(node, now)
            node = node.parent
        return pages

    def insert(self, tokens: list[int], pages: list[int]) -> list[int]:
        """Cache the page-aligned prefix of `tokens` held in `pages` (len(pages) >= full pages of tokens); returns
        the pages caching that prefix now.

        The tree retains the pages it newly stores; where it already had pages for the same tokens it keeps its own
        (returned in their place): the caller's copies there are left to the caller (who releases its own reference
        as usual, or, still running, may read the tree's pages instead and free its copies).
        """
        ps = self.page_size
        full = len(tokens) // ps
        pages = pages[:full]
        node, i, now = self.root, 0, next(_clock)
        cached: list[int] = []
        while i < full:
            child = node.children.get(first := tuple(tokens[i * ps : (i + 1) * ps]))
            if child is None:
                new = _Node(key=tuple(tokens[i * ps : full * ps]), pages=list(pages[i:]), parent=node)
                if node is not self.root and not node.children:
                    self._num_leaves -= 1  # `node` stops being a leaf (its entries go stale)
                node.children[first] = new
                self._num_leaves += 1
                self._touched(new, now)
                self.allocator.retain(new.pages)
                return cached + new.pages
            n = len(child.pages)
            common = self._common_pages(child, tokens, i)
            if common < n:
                self._split(child, common)
            self._touched(child, now)
            cached += child.pages
            node, i = child, i + common
        return cached

    def _common_pages(self, node: _Node, tokens: list[int], i: int) -> int:
        """How many of `node`'s pages hold the full pages of `tokens` from page i on, in order; its first does (the
        caller found `node` by it). The whole edge is compared at once first: long prompts share long edges."""
        ps = self.page_size
        n = min(len(node.pages), len(tokens) // ps - i)
        start = i * ps
        if node.key[: n * ps] == tuple(tokens[start : start + n * ps]):
            return n
        common = 1
        while node.key[common * ps : (common + 1) * ps] == tuple(tokens[start + common * ps : start + (common + 1) * ps]):
            common += 1
        return common

    def _split(self, node: _Node, n_pages: int) -> None:
        """Cut `node` after n_pages pages; the tail becomes its only child."""
        cut = n_pages * self.page_size
        tail = _Node(key=node.key[cut:], pages=node.pages[n_pages:], children=node.children, parent=node,
                     last_access=node.last_access)
        for c in tail.children.values():
            c.parent = tail
        node.key, node.pages = node.key[:cut], node.pages[:n_pages]
        node.children = {tail.key[: self.page_size]: tail}
        if not tail.children:  # the leaf is now the tail (the head's entries went stale)
            self._push(tail)

    def evict(self, num_pages: int) -> int:
        """Free at least num_pages pages from unreferenced leaves, oldest first; returns pages freed."""
        self._unpark()
        freed = 0
        while self._lru and freed < num_pages:
            entry = heapq.heappop(self._lru)
            _, _, leaf = entry
            if leaf.removed or leaf.children or entry[0] != leaf.last_access:
                continue  # stale: evicted, no longer a leaf, or touched since (a newer entry exists)
            if not self._evictable(leaf):
                for p in leaf.pages:
                    self._parked[p] = leaf
                continue
            self.allocator.release(leaf.pages)
            freed += len(leaf.pages)
            leaf.removed = True
            self._num_leaves -= 1
            parent = leaf.parent
            del parent.children[leaf.key[: self.page_size]]
            if parent is not self.root and not parent.children:  # the parent is a leaf now
                self._num_leaves += 1
                self._push(parent)
        return freed

    def _unpark(self) -> None:
        """Parked leaves one of whose pages lost its last other reference go back on the heap."""
        unshared = self.allocator.unshared
        if not unshared:
            return
        for p in unshared:
            leaf = self._parked.pop(p, None)
            if leaf is None or leaf.removed:
                continue
            for q in leaf.pages:
                self._parked.pop(q, None)
            if not leaf.children:  # still a leaf (one that gained children is back when they are gone)
                heapq.heappush(self._lru, (leaf.last_access, next(_clock), leaf))
        unshared.clear()

    def _evictable(self, node: _Node) -> bool:
        return all(self.allocator.refcount[p] == 1 for p in node.pages)

    def _leaves(self) -> list[_Node]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            if n is not self.root and not n.children:
                out.append(n)
            stack.extend(n.children.values())
        return out

    def all_pages(self) -> list[int]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            out.extend(n.pages)
            stack.extend(n.children.values())
        return out

    def reset(self) -> None:
        """Drop every cached prefix (after a weight update the cached KV is stale)."""
        self.allocator.release(self.all_pages())
        self.allocator.unshared.clear()
        self.root = _Node()
        self._lru, self._num_leaves, self._parked = [], 0, {}
