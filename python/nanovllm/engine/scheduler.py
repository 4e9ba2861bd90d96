"""Continuous batching over the C++ block allocator.

A step is either a prefill (new prompts, or chunks of long ones) or a decode of every running sequence.
Prefill goes first. A sequence admitted but not fully prefilled stays at the head of the waiting queue, so
at most one prompt is ever part-way through its prefill.

While a decode step runs on the device, the next one can be planned without its tokens (schedule_ahead): each
sequence's next slot is reserved with the token id pending, the step takes its input ids from the device, and
postprocess fills the ids in. A sequence that the running step finishes (EOS, a stop token) has one wasted row
in the planned step, whose token is dropped.
"""

from collections import deque
from dataclasses import dataclass

from nanovllm_cpp import BlockAllocator

from nanovllm.config import Config
from nanovllm.engine.sequence import Sequence


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # first position computed in this step (earlier ones are cached or computed before)
    end: int    # one past the last; the chunk samples a token when end == len(seq)

    @property
    def samples(self) -> bool:
        return self.end == len(self.seq)


@dataclass
class Batch:
    is_prefill: bool
    chunks: list[PrefillChunk]  # prefill steps
    seqs: list[Sequence]        # decode steps: every running sequence
    # A step planned ahead: for each sequence, the row of the step before whose sampled token is its input.
    input_rows: list[int] | None = None
    # Decode steps: the seqs' ids and, unless planned ahead, their input tokens, as the allocator got them.
    seq_ids: list[int] | None = None
    input_ids: list[int] | None = None

    @property
    def sampling_seqs(self) -> list[Sequence]:
        return [c.seq for c in self.chunks if c.samples] if self.is_prefill else self.seqs


class Scheduler:
    def __init__(self, config: Config, num_blocks: int, eos_token_ids: set[int]):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.eos_token_ids = eos_token_ids
        self.allocator = BlockAllocator(num_blocks, config.kvcache_block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> Batch:
        chunks = self._schedule_prefill()
        if chunks:
            return Batch(True, chunks, [])
        if not self.running:
            raise RuntimeError("scheduler stalled: no running sequence and the next prompt does not fit the KV cache")
        return self._schedule_decode()

    def _schedule_prefill(self) -> list[PrefillChunk]:
        chunks: list[PrefillChunk] = []
        budget = self.max_num_batched_tokens
        alloc = self.allocator
        for seq in list(self.waiting):
            if budget == 0:
                break
            if not seq.admitted:
                if len(self.running) + len(chunks) >= self.max_num_seqs or not alloc.can_allocate(seq.token_ids):
                    break
                seq.num_computed_tokens = alloc.allocate(seq.seq_id, seq.token_ids)
                seq.admitted = True
            start = seq.num_computed_tokens
            end = min(len(seq), start + budget)
            # Commit now, not after the forward: a later prompt of this same step with the same prefix then
            # reuses these blocks (the forward stores every new K/V before any attention reads the cache).
            alloc.commit(seq.seq_id, end)
            seq.num_computed_tokens = end
            budget -= end - start
            chunks.append(PrefillChunk(seq, start, end))
        for chunk in chunks:
            if chunk.samples:
                self.waiting.remove(chunk.seq)
                self.running.append(chunk.seq)
        return chunks

    def _schedule_decode(self) -> Batch:
        # The token sampled last step enters the allocator now: this step computes its KV.
        ids = [s.seq_id for s in self.running]
        while not self.allocator.can_append_all(ids):
            self._preempt(self.running.pop())
            ids.pop()
            if not self.running:  # validation guarantees one request fits the cache alone
                raise RuntimeError("KV cache too small for a single running sequence")
        tokens = [s.last_token for s in self.running]
        self.allocator.append_all(ids, tokens)
        for seq in self.running:
            seq.num_computed_tokens = len(seq)
        return Batch(False, [], list(self.running), seq_ids=ids, input_ids=tokens)

    def schedule_ahead(self, batch: Batch) -> Batch | None:
        """The decode step after `batch`, a decode step whose tokens are not known yet: every sequence of it
        that its token does not bring to max_tokens. None where the next step must see those tokens first:
        requests are waiting (a prefill comes first), or the KV cache is too full to grow every sequence."""
        if batch.is_prefill or self.waiting:
            return None
        rows = [i for i, s in enumerate(batch.seqs)
                if s.finish_reason is None and s.num_completion_tokens + 1 < s.params.max_tokens]
        if not rows:
            return None
        seqs = [batch.seqs[i] for i in rows]
        ids = [s.seq_id for s in seqs]
        if not self.allocator.can_append_all(ids):
            return None
        self.allocator.append_pending_all(ids)
        for seq in seqs:
            seq.num_pending_tokens = 1
            seq.num_computed_tokens = len(seq) + 1
        return Batch(False, [], seqs, rows, seq_ids=ids)

    def _preempt(self, seq: Sequence) -> None:
        """Drop the sequence's blocks; it is recomputed later (prompt + generated tokens, prefix cache helps)."""
        self.allocator.free(seq.seq_id)
        seq.admitted = False
        seq.num_computed_tokens = 0
        # Behind a part-prefilled prompt: that one holds blocks and must finish first.
        at = 1 if self.waiting and self.waiting[0].admitted else 0
        self.waiting.insert(at, seq)
        self.num_preemptions += 1

    def postprocess(self, batch: Batch, token_ids: list[int]) -> list[Sequence]:
        """Append each sampled token; returns the sequences that finished (their blocks are freed). A sequence that
        finished in an earlier step (this step ran ahead of that one's tokens) drops its token."""
        finished = []
        for seq, token in zip(batch.sampling_seqs, token_ids):
            if seq.finish_reason is not None:
                continue
            seq.token_ids.append(token)
            if seq.num_pending_tokens:  # a step planned ahead computes this token's KV
                self.allocator.fill_pending(seq.seq_id, token)
                seq.num_pending_tokens = 0
            params = seq.params
            if not params.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "eos"
            elif token in params.stop_token_ids:
                seq.finish_reason = "stop"
            elif seq.num_completion_tokens >= params.max_tokens:
                seq.finish_reason = "length"
            else:
                continue
            self.allocator.free(seq.seq_id)
            finished.append(seq)
        if finished:  # one pass, not a list.remove per finished sequence
            self.running = [s for s in self.running if s.finish_reason is None]
        return finished

    def abort_all(self) -> None:
        """Drop every request (generate() was interrupted): the engine is left empty and usable. The prefix
        cache is dropped too: blocks are committed when scheduled, so an interrupted step may have made blocks
        findable whose KV was never written."""
        for seq in [*self.running, *self.waiting]:
            if self.allocator.has_sequence(seq.seq_id):
                self.allocator.free(seq.seq_id)
        self.running.clear()
        self.waiting.clear()
        self.allocator.reset_prefix_cache()
