"""The leading decode rows of the last batch, kept for the next step.

A decode row's entry changes little from one step to the next: its position and output step advance by one,
its page list (the sequence's own, extended in place) gains a page every page_size steps. `Batcher.schedule`
asked `running_step` of every running row and built a new BatchEntry for each, every step. Here the rows that
led the last batch, in `running` order, are checked against the same rules and their entries advanced in
place, one attribute pass a row; from the first row that fails a check (it finished, was preempted or aborted,
reached a length limit, had its token in flight read back by a drain, or needs a page that only eviction or
preemption can free) the batcher's general loop takes over, as before.

One Python loop, not numpy or `map` passes: each row is a handful of attribute reads and writes, and the
two dozen calls a vectorised version makes each step cost more than that at batch 64 (measured in the
engine: slower than building the entries there).

Entries are advanced while the step that used them is still in flight: its read-back (Scheduler.process)
reads only a decode entry's `sample` and `prompt_targets`, which never change for a decode row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hotswap.cache.page_allocator import PageAllocator
from hotswap.runner.batch_entry import BatchEntry
from hotswap.scheduler.sequence import Sequence


@dataclass(slots=True)
class KeptDecode:
    """Row i: `seqs[i]` (running[i] when kept) and its decode entry of the last step."""

    seqs: list[Sequence]
    entries: list[BatchEntry]
    prompt_lens: list[int]
    ceiling: list[int]  # a row decodes while its output is shorter: no length limit is reached with the token it samples
    penalized: list[int]  # rows whose penalty state is planned again every step

    @classmethod
    def of(cls, seqs: list[Sequence], entries: list[BatchEntry], max_context_len: int) -> KeptDecode:
        prompt_lens = [len(s.req.input_ids) for s in seqs]
        # running_step's NOTHING: len(output) + 1 >= max_new_tokens, or prompt + len(output) + 1 >= max_context_len
        ceiling = [min(e.params.max_new_tokens - 1, max_context_len - 1 - n) for e, n in zip(entries, prompt_lens)]
        return cls(seqs, entries, prompt_lens, ceiling, [r for r, e in enumerate(entries) if e.row.penalized])

    def advance(self, running: list[Sequence], budget: int, allocator: PageAllocator,
                plan_penalties: Callable[[Sequence, BatchEntry], None]) -> list[BatchEntry]:
        """This step's entries of the leading rows that still decode (`running_step` DECODE: running[r], one
        token in flight, every earlier token computed, no length limit reached with it), at most `budget`,
        advanced in place with their sequences' bookkeeping (what `Batcher._decode_entry` does for a row). A
        row at a page boundary takes a page in row order, as the general loop does, but only a free one."""
        page_size, prompt_lens, ceiling = allocator.page_size, self.prompt_lens, self.ceiling
        m = 0
        for seq, entry, now in zip(self.seqs, self.entries, running[:budget]):
            if seq is not now or seq.pending != 1:
                break
            computed, out = seq.num_computed, len(seq.output_ids)
            if computed != prompt_lens[m] + out or out >= ceiling[m]:
                break
            pages = seq.pages
            if computed == len(pages) * page_size:  # its pages hold every computed position: the next needs one more
                if allocator.num_free < 1:
                    break
                pages.extend(allocator.allocate(1))
            entry.pages, entry.start_pos, entry.step, entry.prev_row = pages, computed, out + 1, seq.pending_row
            seq.num_computed, seq.pending = computed + 1, 2
            m += 1
        entries = self.entries[:m]
        for r in self.penalized:
            if r < m:
                entry = entries[r]
                entry.prompt_ids = entry.output_ids = entry.banned_ids = None
                plan_penalties(self.seqs[r], entry)
        return entries
