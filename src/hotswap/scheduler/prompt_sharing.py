"""Prompt pages shared while they are being computed: the batcher's part of the prefix cache for running prompts.

Every fresh sequence's full prompt pages enter the prefix cache as they are computed, not only when the sequence
ends (SGLang caches an unfinished request's prompt the same way): a request that arrives while another one with
the same prefix runs (a sample of the same prompt sent a moment later, prompts sharing a system prompt or few-shot
examples) matches it. A fresh sequence whose next uncached prompt pages another running sequence is computing
right now (GRPO's n samples of one prompt admitted together, a batch of prompts with a common head) waits until
they are in and matches them instead of computing them again; it waits only for at least `FOLLOW_MIN_TOKENS`
shared tokens, or for all it could match.

Pages are published at the start of a schedule call, from what the calls before planned: the steps computing them
have launched and run before any step that reads them. Only pages of sequences still running on the weights
their KV is computed with (`epoch`, the batcher's cache epoch) are published or waited for.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from hotswap.cache.page_allocator import PageAllocator
from hotswap.cache.radix_cache import RadixPrefixCache
from hotswap.scheduler.sequence import Sequence, Status

FOLLOW_MIN_TOKENS = 32  # a shorter shared run (and not all a prompt could match) is computed again: no wait


@dataclass(eq=False, slots=True)
class _PromptInFlight:
    """A fresh sequence while it computes full pages of its prompt that the prefix cache lacks."""

    seq: Sequence
    keys: list[int]  # its prompt's page keys (Sequence.prompt_page_keys)
    # prompt pages [0, published) are in the prefix cache: matched at admission, or published (a preemption may let
    # the cache evict some; re-admitted in the same call, it computes and publishes them again)
    published: int


@dataclass(kw_only=True, slots=True)
class PromptSharing:
    allocator: PageAllocator
    prefix_cache: RadixPrefixCache
    _computing: list[_PromptInFlight] = field(default_factory=list)  # prompts whose pages are still being published
    _page_owner: dict[int, _PromptInFlight] = field(default_factory=dict)  # page key -> who computes that page now
    _waits: dict[Sequence, int] = field(default_factory=dict)  # sequences waiting in this call -> the last page they wait for
    _waited: dict[Sequence, int] = field(default_factory=dict)  # the same, from the call before

    def begin_call(self, epoch: int) -> None:
        """Start of a schedule call: publish what the calls before planned; this call's waits start afresh."""
        if self._computing:
            self._publish(epoch)
        self._waited, self._waits = self._waits, {}

    def start(self, seq: Sequence, epoch: int) -> None:
        """A freshly admitted sequence computes the prompt pages past its match: others may wait for them."""
        keys = seq.prompt_page_keys(self.allocator.page_size)
        entry = _PromptInFlight(seq=seq, keys=keys, published=seq.num_computed // self.allocator.page_size)
        if entry.published >= len(keys):
            return
        for key in keys[entry.published :]:
            if self._owner_computing(key, epoch) is None:
                self._page_owner[key] = entry
        self._computing.append(entry)

    def still_waits(self, seq: Sequence, epoch: int) -> bool:
        """A sequence that waited in the call before, for prompt pages up to a page still being computed, waits on
        without being matched again: it is matched when it starts waiting and once the run it waits for is in,
        not at every step (a long head computed in many chunks, many waiting)."""
        last = self._waited.get(seq)
        if last is None or self._owner_computing(seq.prompt_page_keys(self.allocator.page_size)[last], epoch) is None:
            return False
        self._waits[seq] = last
        return True

    def follows(self, seq: Sequence, matchable_tokens: int, epoch: int) -> bool:
        """A fresh sequence, its prefix matched (`seq.pages`), whose next prompt pages another running sequence is
        computing now (planned in this call or an earlier one): it waits, and matches them once they are
        published. Only for a shared run of at least FOLLOW_MIN_TOKENS, or of every page a match could give it
        (`matchable_tokens`); it then waits for that whole run (`still_waits`)."""
        if seq.admitted:
            return False
        ps = self.allocator.page_size
        matchable, have = matchable_tokens // ps, len(seq.pages)
        if matchable <= have:
            return False
        keys = seq.prompt_page_keys(ps)
        last = min(matchable, have + -(-FOLLOW_MIN_TOKENS // ps)) - 1  # keys chain: this page shared => all before
        owner = self._owner_computing(keys[last], epoch)
        if owner is None:
            return False
        # the end of the run it shares with `owner`: the keys chain, so they are equal up to a page, different after
        shared = bisect.bisect_left(range(last + 1, min(matchable, len(owner.keys))), True, key=lambda j: keys[j] != owner.keys[j])
        self._waits[seq] = last + shared
        return True

    def _owner_computing(self, key: int, epoch: int) -> _PromptInFlight | None:
        """The sequence computing the prompt page `key` names now, for sequences that may wait for it."""
        owner = self._page_owner.get(key)
        return owner if owner is not None and self._publishes(owner, epoch) else None

    @staticmethod
    def _publishes(entry: _PromptInFlight, epoch: int) -> bool:
        """Its sequence still runs on the weights its prompt's KV is computed with: its pages will be published."""
        return entry.seq.status is Status.RUNNING and entry.seq.cache_epoch == epoch

    def _publish(self, epoch: int) -> None:
        """The full prompt pages each fresh sequence planned in the calls before enter the prefix cache. Not at the
        end of the call that plans them: that step may still fail to launch (undo_launch, a row refused), leaving
        pages never written; their sequence then no longer runs and publishes nothing. A sequence whose prompt
        is published through its last full page, or that stopped running, is forgotten."""
        ps, still = self.allocator.page_size, []
        for entry in self._computing:
            seq = entry.seq
            if self._publishes(entry, epoch):
                done = min(seq.num_computed, seq.prompt_len) // ps
                if done > entry.published:
                    self._read_cached_copies(seq, self.prefix_cache.insert(seq.req.input_ids[: done * ps], seq.pages))
                    self._disown(entry, done)
                    entry.published = done
                if entry.published < len(entry.keys):
                    still.append(entry)
                    continue
            self._disown(entry, len(entry.keys))
        self._computing = still

    def _read_cached_copies(self, seq: Sequence, cached: list[int]) -> None:
        """`seq`, still running, reads the prefix cache's copy of each prompt page the cache already had when its
        own was published (computed twice at once: another sequence's was cached first) and frees its own: else
        its copies stay held beside the cache's, pinned under `seq`'s later pages, and the pool is short by them
        until `seq` ends. Its steps launched so far were given its old page list (a new list is made here)."""
        own = seq.pages
        if cached == own[: len(cached)]:  # the common case: its own pages went in (one comparison in C)
            return
        twice = [i for i, p in enumerate(cached) if p != own[i]]
        self.allocator.retain([cached[i] for i in twice])
        self.allocator.release([own[i] for i in twice])
        seq.pages = cached + own[len(cached) :]

    def _disown(self, entry: _PromptInFlight, upto: int) -> None:
        """Pages [published, upto) of `entry`'s prompt are no longer being computed by it."""
        for key in entry.keys[entry.published : upto]:
            if self._page_owner.get(key) is entry:
                del self._page_owner[key]
