"""The C++ block allocator against a plain-Python allocator of the same logic.

CPU only: `pytest benchmarks/bench_allocator.py` prints ops/s of both and their ratio.

One round = the bookkeeping of a whole offline batch: 512 prompts of 100-1000 tokens are allocated and
committed, then every sequence grows by 128 decode tokens (one append_all per step, as the engine calls it),
then all are freed. An op is one sequence-level call: allocate, commit, one token appended, free.
"""

import random
import time
from collections import OrderedDict

import pytest

from nanovllm_cpp import BlockAllocator

NUM_SEQS, DECODE_STEPS, BLOCK_SIZE, VOCAB = 512, 128, 16, 32000
OPS_PER_ROUND = NUM_SEQS * (3 + DECODE_STEPS)


class PyBlockAllocator:
    """Python twin of csrc/block_allocator.cpp: free list (uncached at the head, cached LRU at the tail), ref
    counts, chained block hashes confirmed by a token and parent check on every hit."""

    def __init__(self, num_blocks, block_size):
        self.bs = block_size
        self.ref = [0] * num_blocks
        self.hash = [None] * num_blocks      # set while the block is findable
        self.contents = [None] * num_blocks  # token tuple of a hashed block
        self.parent = [-1] * num_blocks
        self.parent_gen = [0] * num_blocks
        self.gen = [0] * num_blocks
        self.free_list = OrderedDict.fromkeys(range(num_blocks))  # head = next handed out
        self.prefix_map: dict[int, int] = {}
        self.seqs: dict[int, list] = {}      # id -> [tokens, blocks, num_hashed_blocks]

    def _take(self):
        b, _ = self.free_list.popitem(last=False)
        if self.hash[b] is not None:
            if self.prefix_map.get(self.hash[b]) == b:
                del self.prefix_map[self.hash[b]]
            self.hash[b] = None
        self.gen[b] += 1
        self.parent[b], self.ref[b] = -1, 1
        return b

    def _match(self, tokens):
        hits, h, parent = [], 0, -1
        for i in range((len(tokens) - 1) // self.bs):
            chunk = tuple(tokens[i * self.bs:(i + 1) * self.bs])
            h = hash((h, chunk))
            b = self.prefix_map.get(h)
            if b is None or self.contents[b] != chunk or self.parent[b] != parent or (
                    parent != -1 and self.parent_gen[b] != self.gen[parent]):
                break
            hits.append(b)
            parent = b
        return hits

    def allocate(self, seq_id, tokens):
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} is already allocated")
        hits = self._match(tokens)
        needed = -(-len(tokens) // self.bs)
        if needed - len(hits) > len(self.free_list) - sum(self.ref[b] == 0 for b in hits):
            raise RuntimeError(f"sequence {seq_id}: out of blocks")
        for b in hits:
            if self.ref[b] == 0:
                del self.free_list[b]
            self.ref[b] += 1
        blocks = hits + [self._take() for _ in range(needed - len(hits))]
        self.seqs[seq_id] = [list(tokens), blocks, len(hits)]
        return len(hits) * self.bs

    def _register(self, seq, i):
        tokens, blocks, _ = seq
        b, parent = blocks[i], blocks[i - 1] if i else -1
        chunk = tuple(tokens[i * self.bs:(i + 1) * self.bs])
        self.hash[b] = hash((self.hash[parent] if i else 0, chunk))
        self.contents[b], self.parent[b] = chunk, parent
        self.parent_gen[b] = self.gen[parent] if i else 0
        self.prefix_map[self.hash[b]] = b
        seq[2] = i + 1

    def commit(self, seq_id, num_tokens):
        seq = self.seqs[seq_id]
        while (seq[2] + 1) * self.bs <= num_tokens:
            self._register(seq, seq[2])

    def append_all(self, seq_ids, tokens):
        if sum(len(self.seqs[s][0]) % self.bs == 0 for s in seq_ids) > len(self.free_list):
            raise RuntimeError("append_all: out of blocks")
        for s, t in zip(seq_ids, tokens):
            seq = self.seqs[s]
            if len(seq[0]) % self.bs == 0:
                seq[1].append(self._take())
            seq[0].append(t)
            full = len(seq[0]) // self.bs
            if seq[2] == full - 1 and len(seq[0]) % self.bs == 0:
                self._register(seq, full - 1)

    def free(self, seq_id):
        for b in reversed(self.seqs.pop(seq_id)[1]):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_list[b] = None
                if self.hash[b] is None:
                    self.free_list.move_to_end(b, last=False)


def make_prompts(shared: bool) -> list[list[int]]:
    rng = random.Random(0)
    if not shared:
        return [[rng.randrange(VOCAB) for _ in range(rng.randint(100, 1000))] for _ in range(NUM_SEQS)]
    # Four system prompts of 384 tokens, each followed by a private question: 400-1000 tokens in all.
    systems = [[rng.randrange(VOCAB) for _ in range(384)] for _ in range(4)]
    return [systems[i % 4] + [rng.randrange(VOCAB) for _ in range(rng.randint(16, 616))] for i in range(NUM_SEQS)]


def run_batch(alloc, prompts, decode_tokens):
    ids = list(range(len(prompts)))
    for i, p in enumerate(prompts):
        alloc.allocate(i, p)
        alloc.commit(i, len(p))
    for step_tokens in decode_tokens:
        alloc.append_all(ids, step_tokens)
    for i in ids:
        alloc.free(i)


IMPLS = {"C++": BlockAllocator, "Python": PyBlockAllocator}
results: dict[tuple[str, bool], float] = {}  # (impl, shared) -> seconds per round


@pytest.mark.parametrize("shared", [False, True], ids=["distinct", "shared-prefix"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_allocator_batch(benchmark, impl, shared):
    prompts = make_prompts(shared)
    rng = random.Random(1)
    decode_tokens = [[rng.randrange(VOCAB) for _ in range(NUM_SEQS)] for _ in range(DECODE_STEPS)]
    num_blocks = NUM_SEQS * -(-(1000 + DECODE_STEPS) // BLOCK_SIZE)

    def setup():
        return (IMPLS[impl](num_blocks, BLOCK_SIZE), prompts, decode_tokens), {}

    benchmark.pedantic(run_batch, setup=setup, rounds=5 if impl == "C++" else 3, iterations=1)
    results[(impl, shared)] = benchmark.stats.stats.median
    benchmark.extra_info["ops_per_s"] = OPS_PER_ROUND / results[(impl, shared)]


def test_print_ratio_table(capsys):
    """Runs after the benchmarks above (file order): prints ops/s of both and the speed-up."""
    if len(results) < len(IMPLS) * 2:
        pytest.skip("needs all test_allocator_batch cases in this session")
    rows = [f"{'workload':<14} {'C++ ops/s':>12} {'Python ops/s':>13} {'C++/Python':>11}"]
    for shared in (False, True):
        cpp, py = (OPS_PER_ROUND / results[(impl, shared)] for impl in IMPLS)
        rows.append(f"{'shared-prefix' if shared else 'distinct':<14} {cpp:>12,.0f} {py:>13,.0f} {cpp / py:>10.1f}x")
    with capsys.disabled():
        print(f"\nblock allocator, {NUM_SEQS} seqs x ({DECODE_STEPS} appends + allocate/commit/free), "
              f"{OPS_PER_ROUND} ops per round\n" + "\n".join(rows))


def phase_seconds(impl, prompts, decode_tokens, num_blocks) -> dict[str, float]:
    """Seconds of each phase of run_batch, for one fresh allocator."""
    alloc, ids = IMPLS[impl](num_blocks, BLOCK_SIZE), list(range(len(prompts)))
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        alloc.allocate(i, p)
    t1 = time.perf_counter()
    for i, p in enumerate(prompts):
        alloc.commit(i, len(p))
    t2 = time.perf_counter()
    for step_tokens in decode_tokens:
        alloc.append_all(ids, step_tokens)
    t3 = time.perf_counter()
    for i in ids:
        alloc.free(i)
    t4 = time.perf_counter()
    return {"allocate": t1 - t0, "commit": t2 - t1, "decode step": (t3 - t2) / len(decode_tokens), "free": t4 - t3}


def test_print_phase_breakdown(capsys):
    """Where the time goes (median of 3): allocate converts each prompt's token list at the binding."""
    prompts = make_prompts(shared=False)
    rng = random.Random(1)
    decode_tokens = [[rng.randrange(VOCAB) for _ in range(NUM_SEQS)] for _ in range(DECODE_STEPS)]
    num_blocks = NUM_SEQS * -(-(1000 + DECODE_STEPS) // BLOCK_SIZE)
    rows = [f"{'phase (distinct)':<18} {'C++ us':>10} {'Python us':>10}"]
    runs = {impl: [phase_seconds(impl, prompts, decode_tokens, num_blocks) for _ in range(3)] for impl in IMPLS}
    for phase in runs["C++"][0]:
        cpp, py = (sorted(r[phase] for r in runs[impl])[1] * 1e6 for impl in IMPLS)
        rows.append(f"{phase:<18} {cpp:>10.0f} {py:>10.0f}")
    with capsys.disabled():
        print(f"\nper phase, {NUM_SEQS} sequences (decode step = one append_all of {NUM_SEQS} tokens)\n"
              + "\n".join(rows))


def test_python_twin_agrees_with_cpp():
    """The baseline is a fair comparison only if it does the same work: same hits, same block ids, same LRU."""
    prompts = make_prompts(shared=True)[:64] + make_prompts(shared=False)[:64]
    ids = list(range(len(prompts)))
    cpp, py = BlockAllocator(4096, BLOCK_SIZE), PyBlockAllocator(4096, BLOCK_SIZE)
    for round_ in range(2):  # the second round hits blocks the first one freed
        for i, p in enumerate(prompts):
            assert cpp.allocate(i, p) == py.allocate(i, p)
            cpp.commit(i, len(p))
            py.commit(i, len(p))
        for step in range(20):
            cpp.append_all(ids, [step] * len(ids))
            py.append_all(ids, [step] * len(ids))
        assert all(cpp.block_table(i) == py.seqs[i][1] for i in ids)
        for i in ids[::-1] if round_ else ids:
            cpp.free(i)
            py.free(i)
        assert cpp.free_list() == list(py.free_list)
    assert cpp.stats.hit_tokens > 0
