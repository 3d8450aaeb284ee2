"""Admission, chunked prefill, cache growth and preemption: which tokens start this step."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from parcae_serve.server.engine.kv_cache import KVCache
from parcae_serve.server.engine.sequence import Sequence


@dataclass
class SchedulerConfig:
    max_batch: int = 64  # sequences computed at once
    max_queue: int = 256  # sequences waiting for admission before 429
    prefill_chunk: int = 256  # prompt tokens started per step (keeps running streams moving)
    max_context: int = 2048


@dataclass
class Work:
    seq: Sequence
    start: int
    end: int  # positions [start, end) go through the model


class QueueFull(Exception):
    pass


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCache) -> None:
        self.config, self.cache = config, cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def admit(self, namespace_of) -> list[Sequence]:
        """Start waiting sequences (FIFO) while batch slots and cache memory allow."""
        admitted = []
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            loops = seq.request.loops
            table = self.cache.new_table(loops.depth, namespace_of(seq), loops.kv_policy)
            # reusing blocks is exact only when they keep every loop's K/V (see BlockTable.exact)
            reusable = seq.request.sampling.prompt_logprobs is None and table.exact
            hit = self.cache.attach_prefix(table, seq.tokens) if reusable else 0
            if not self.cache.ensure(table, len(seq.tokens) + 1):
                self.cache.free(table)
                break
            self.cache.prefix_queries += reusable
            self.cache.prefix_hits += hit > 0
            self.waiting.popleft()
            seq.table, seq.computed = table, hit
            seq.admitted_at = seq.admitted_at or time.monotonic()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def plan(self) -> list[Work]:
        """The groups to start now: a prefill chunk or the next decode token per idle sequence."""
        work, budget = [], self.config.prefill_chunk
        for seq in list(self.running):
            if seq.in_flight or seq.finished or seq not in self.running:
                continue
            start = seq.computed
            remaining = len(seq.tokens) - start
            if remaining > 1:
                if budget <= 0:
                    continue
                # a lossy policy prefills in one chunk: loop t then sees every position's loop t
                take = min(remaining, budget) if seq.table.exact else remaining
                end, budget = start + take, budget - take
            else:
                end = start + 1
            if not self._grow(seq, end + 1):
                continue
            seq.in_flight = True
            work.append(Work(seq, start, end))
        work.sort(key=lambda w: w.end - w.start > 1)  # decode tokens first: one batched SDPA
        return work

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Make room for `tokens` positions, preempting the youngest idle sequences if needed."""
        while not self.cache.ensure(seq.table, tokens):
            victims = [s for s in self.running if s is not seq and not s.in_flight]
            if not victims:
                if not any(s.in_flight for s in self.running):
                    self.preempt(seq)  # alone and still short: start again when memory frees
                return False
            self.preempt(max(victims, key=lambda s: s.arrival))
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free a sequence's cache and queue it again; it recomputes its tokens when readmitted."""
        self.cache.free(seq.table)
        seq.table, seq.computed, seq.in_flight = None, 0, False
        seq.last_h = None
        seq.preemptions += 1
        if not seq.output:  # the prompt is scored again from scratch; once reported, kept
            seq.prompt_depths, seq.prompt_scores = [], []
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def retire(self, seq: Sequence) -> None:
        if seq.table is not None:
            self.cache.free(seq.table)
            seq.table = None
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
