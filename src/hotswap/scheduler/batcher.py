"""Admission and batch formation: a token budget, chunked prefill, mixed prefill/decode, preemption.

Running sequences are served first, oldest first; when pages run out the prefix cache is evicted, then
the newest running sequence is preempted (its pages freed, recomputed later from its tokens).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.kv_cache import KVCachePool
from hotswap.runner.radix_cache import RadixPrefixCache
from hotswap.scheduler.sequence import Sequence, Status


@dataclass(kw_only=True, slots=True)
class ScheduledBatch:
    seqs: list[Sequence]
    entries: list[BatchEntry]


@dataclass(kw_only=True, slots=True)
class Batcher:
    pool: KVCachePool
    prefix_cache: RadixPrefixCache | None
    max_running_requests: int
    max_num_batched_tokens: int
    max_context_len: int
    chunked_prefill_size: int
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    num_preemptions: int = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _pages_needed(self, seq: Sequence, upto: int) -> int:
        return max(0, -(-upto // self.pool.page_size) - len(seq.pages))

    def _ensure_free(self, n: int) -> bool:
        if self.pool.num_free < n and self.prefix_cache is not None:
            self.prefix_cache.evict(n - self.pool.num_free)
        return self.pool.num_free >= n

    def schedule(self, admit_new: bool = True) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        entries: list[BatchEntry] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.pending and self._finishes_with_pending(seq):
                i += 1  # its last token is in flight: nothing more to compute
                continue
            n = min(seq.num_tokens + seq.pending - seq.num_computed, self.chunked_prefill_size, budget)
            need = self._pages_needed(seq, seq.num_computed + n)
            if need:
                while not self._ensure_free(need):
                    victim = self.running[-1]
                    self.preempt(victim)
                    if victim is seq:
                        break
                if seq.status is not Status.RUNNING:
                    break
                seq.pages.extend(self.pool.allocate(need))
            entries.append(self._entry(seq, n))
            seqs.append(seq)
            budget -= n
            i += 1
        while admit_new and self.waiting and budget > 0 and len(self.running) < self.max_running_requests:
            seq = self.waiting[0]
            if seq.pending:  # preempted with a token in flight: admit it once that token is read back
                break
            if not seq.pages:
                self._match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, self.chunked_prefill_size, budget)
            need = self._pages_needed(seq, seq.num_computed + n)
            if not self._ensure_free(need):
                break
            self.waiting.popleft()
            seq.pages.extend(self.pool.allocate(need))
            seq.status = Status.RUNNING
            self.running.append(seq)
            entries.append(self._entry(seq, n))
            seqs.append(seq)
            budget -= n
        return ScheduledBatch(seqs=seqs, entries=entries) if entries else None

    def _finishes_with_pending(self, seq: Sequence) -> bool:
        """The token in flight is the last one for sure (length limits; eos is only known later)."""
        return len(seq.output_ids) + seq.pending >= seq.req.sampling_params.max_new_tokens or seq.num_tokens + seq.pending >= self.max_context_len

    def _entry(self, seq: Sequence, n: int) -> BatchEntry:
        """Plan computing tokens [num_computed, num_computed + n) and advance the sequence's bookkeeping
        now, so the next step can be scheduled while this one runs."""
        start = seq.num_computed
        end = start + n
        known = seq.num_tokens
        entry = BatchEntry(
            input_ids=seq.tokens_slice(start, min(end, known)) + [0] * max(0, end - max(start, known)),
            start_pos=start,
            pages=seq.pages,
            sample=end == known + seq.pending,
            params=seq.req.sampling_params,
            seed=seq.req.seed,
            step=len(seq.output_ids) + seq.pending,
            prev_row=seq.pending_row if end > known else -1,
        )
        seq.num_computed = end
        if entry.sample:
            seq.pending += 1
        return entry

    def _match_prefix(self, seq: Sequence) -> None:
        """Reuse cached pages for the prompt's prefix, leaving at least one token to compute."""
        if self.prefix_cache is None:
            return
        pages = self.prefix_cache.match(seq.token_ids[: seq.num_tokens - 1])
        self.pool.retain(pages)
        seq.pages = pages
        seq.num_computed = len(pages) * self.pool.page_size
        if not seq.admitted:
            seq.cached_tokens = seq.num_computed
            seq.admitted = True

    def cache_and_release(self, seq: Sequence) -> None:
        """Hand a sequence's computed full pages to the prefix cache and drop its own references."""
        if self.prefix_cache is not None and seq.num_computed:
            self.prefix_cache.insert(seq.token_ids[: seq.num_computed], seq.pages)
        self.pool.release(seq.pages)
        seq.pages = []
        seq.num_computed = 0

    def preempt(self, seq: Sequence, *, out_of_pages: bool = True) -> None:
        """Free a running sequence's pages and put it first in line; it is recomputed from its tokens."""
        self.running.remove(seq)
        self.cache_and_release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += out_of_pages

    def retract_all(self) -> None:
        """pause_generation("retract"): every running sequence goes back to waiting (not counted as preemption)."""
        for seq in reversed(list(self.running)):
            self.preempt(seq, out_of_pages=False)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache_and_release(seq)
        seq.status = Status.FINISHED

    def find(self, rid: str) -> Sequence | None:
        return next((s for s in (*self.running, *self.waiting) if s.rid == rid), None)

    def all_seqs(self) -> list[Sequence]:
        return [*self.running, *self.waiting]
