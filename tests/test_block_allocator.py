"""Tests of the C++ block allocator (nanovllm_cpp.BlockAllocator): paging, ref counts, prefix caching."""

import random

import numpy as np
import pytest

from nanovllm_cpp import BlockAllocator, OutOfBlocksError

ROOT = BlockAllocator.ROOT_HASH


def chain_hashes(tokens, block_size, hash_bits=64):
    """Expected hash of every full block of `tokens`, recomputed block by block from the root."""
    mask = (1 << hash_bits) - 1
    hashes, parent = [], ROOT
    for i in range(len(tokens) // block_size):
        parent = BlockAllocator.chain_hash(parent, tokens[i * block_size:(i + 1) * block_size]) & mask
        hashes.append(parent)
    return hashes


def tokens_of(n, seed, vocab=1000):
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def blocks_needed(n, bs):
    return -(-n // bs)


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("bs", [8, 16, 32, 64, 256])
def test_power_of_two_block_sizes_work(bs):
    a = BlockAllocator(4, bs)
    assert a.block_size == bs and a.num_blocks == 4 and a.num_free_blocks == 4
    assert a.allocate(0, list(range(bs + 1))) == 0
    assert len(a.block_table(0)) == 2


@pytest.mark.parametrize("bs", [0, 1, 2, 4, 7, 12, 24, 100, -16])
def test_bad_block_sizes_are_rejected(bs):
    with pytest.raises(ValueError, match="block_size must be a power of two >= 8"):
        BlockAllocator(4, bs)


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_bad_num_blocks_rejected(num_blocks):
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        BlockAllocator(num_blocks, 16)


@pytest.mark.parametrize("bits", [-1, 65])
def test_bad_hash_bits_rejected(bits):
    with pytest.raises(ValueError, match="hash_bits"):
        BlockAllocator(4, 16, hash_bits=bits)


def test_fresh_allocator_state():
    a = BlockAllocator(5, 16)
    assert a.free_list() == [0, 1, 2, 3, 4]
    assert a.num_free_blocks == 5 and a.num_sequences == 0 and a.prefix_caching
    assert all(a.ref_count(b) == 0 and not a.is_cached(b) for b in range(5))
    s = a.stats
    assert (s.query_tokens, s.hit_tokens, s.evictions) == (0, 0, 0)


def test_block_ids_out_of_range():
    a = BlockAllocator(2, 16)
    for f in (a.ref_count, a.is_cached, a.block_hash):
        with pytest.raises(IndexError, match="out of range"):
            f(2)
        with pytest.raises(IndexError):
            f(-1)


# ---------------------------------------------------------------- allocate / append / free


@pytest.mark.parametrize("bs", [8, 16, 32])
@pytest.mark.parametrize("mult,extra", [(0, 1), (1, -1), (1, 0), (1, 1), (2, 0), (3, 5)])
def test_allocate_builds_table_from_free_list(bs, mult, extra):
    n = mult * bs + extra
    a = BlockAllocator(8, bs)
    assert a.allocate(7, tokens_of(n, 1)) == 0
    table = a.block_table(7)
    assert table == list(range(blocks_needed(n, bs)))  # taken from the head of the free list, in order
    assert a.num_tokens(7) == n and a.has_sequence(7) and a.num_sequences == 1
    assert a.num_free_blocks == 8 - len(table)
    assert a.free_list() == list(range(len(table), 8))
    assert all(a.ref_count(b) == 1 for b in table)


def test_can_allocate_boundary_and_out_of_blocks():
    a = BlockAllocator(4, 16)
    a.allocate(0, tokens_of(33, 1))  # 3 blocks
    assert a.can_allocate(tokens_of(16, 2))
    assert not a.can_allocate(tokens_of(17, 2))
    with pytest.raises(OutOfBlocksError, match="needs 2 new blocks but only 1 are free"):
        a.allocate(1, tokens_of(17, 2))
    assert not a.has_sequence(1) and a.num_free_blocks == 1 and a.free_list() == [3]
    assert issubclass(OutOfBlocksError, RuntimeError)


def test_prompt_larger_than_cache():
    a = BlockAllocator(2, 16)
    assert not a.can_allocate(tokens_of(33, 0))
    with pytest.raises(OutOfBlocksError, match="needs 3 blocks of 16 tokens but the cache has only 2"):
        a.allocate(0, tokens_of(33, 0))
    assert a.num_free_blocks == 2


def test_allocate_errors():
    a = BlockAllocator(4, 16)
    a.allocate(3, [1, 2, 3])
    with pytest.raises(ValueError, match="sequence 3 is already allocated"):
        a.allocate(3, [1, 2, 3])
    with pytest.raises(ValueError, match="empty prompt"):
        a.allocate(4, [])
    with pytest.raises(ValueError, match="token id -5 at position 1 is negative"):
        a.allocate(5, [1, -5, 3])
    assert not a.has_sequence(4) and not a.has_sequence(5)
    assert a.num_free_blocks == 3 and a.block_table(3) == [0]


@pytest.mark.parametrize("bs", [8, 16])
def test_append_grows_one_block_per_block_size(bs):
    a = BlockAllocator(3, bs)
    a.allocate(0, tokens_of(bs - 1, 0))
    assert a.can_append(0)
    a.append(0, 5)  # fills block 0
    assert a.block_table(0) == [0] and a.num_free_blocks == 2
    a.append(0, 6)  # needs block 1
    assert a.block_table(0) == [0, 1] and a.num_tokens(0) == bs + 1 and a.num_free_blocks == 1
    for t in range(bs - 1):
        a.append(0, t)
    assert a.block_table(0) == [0, 1]
    a.append(0, 1)
    assert a.block_table(0) == [0, 1, 2] and a.num_free_blocks == 0
    for t in range(bs - 1):
        assert a.can_append(0)
        a.append(0, t)
    assert not a.can_append(0)  # a full last block and nothing free
    with pytest.raises(OutOfBlocksError, match="sequence 0 needs a new block but none is free"):
        a.append(0, 1)
    assert a.num_tokens(0) == 3 * bs and len(a.block_table(0)) == 3


def test_append_negative_token_rejected():
    a = BlockAllocator(2, 16)
    a.allocate(0, [1])
    with pytest.raises(ValueError, match="negative"):
        a.append(0, -1)
    assert a.num_tokens(0) == 1


def test_append_all_is_all_or_nothing():
    a = BlockAllocator(4, 8)
    a.allocate(0, tokens_of(8, 0))   # full: next token needs a block
    a.allocate(1, tokens_of(3, 1))   # room left
    a.allocate(2, tokens_of(16, 2))  # full: next token needs a block
    assert a.num_free_blocks == 0
    assert a.can_append_all([1])
    assert not a.can_append_all([0, 1])
    with pytest.raises(OutOfBlocksError, match="append_all: not enough free blocks for 2 sequences"):
        a.append_all([0, 1], [4, 5])
    assert (a.num_tokens(0), a.num_tokens(1)) == (8, 3)
    a.append_all([1], [9])
    assert a.num_tokens(1) == 4
    a.free(2)  # two blocks back
    assert a.can_append_all([0, 1])
    a.append_all([0, 1], [4, 5])
    assert (a.num_tokens(0), a.num_tokens(1)) == (9, 5)
    assert len(a.block_table(0)) == 2 and a.num_free_blocks == 1


def test_append_all_validates_before_changing_anything():
    a = BlockAllocator(4, 8)
    a.allocate(0, [1, 2])
    with pytest.raises(ValueError, match="2 sequences but 1 tokens"):
        a.append_all([0, 0], [1])
    with pytest.raises(ValueError, match="sequence 9 has no blocks"):
        a.append_all([0, 9], [1, 2])
    with pytest.raises(ValueError, match="negative"):
        a.append_all([0], [-3])
    assert a.num_tokens(0) == 2


def test_free_returns_blocks_and_double_free_fails():
    a = BlockAllocator(4, 16)
    a.allocate(0, tokens_of(40, 0))
    a.free(0)
    assert a.num_free_blocks == 4 and not a.has_sequence(0) and a.num_sequences == 0
    assert all(a.ref_count(b) == 0 for b in range(4))
    with pytest.raises(ValueError, match="sequence 0 has no blocks \\(never allocated, or freed already\\)"):
        a.free(0)


def test_unknown_sequence_operations_fail():
    a = BlockAllocator(4, 16)
    for call in (lambda: a.append(42, 1), lambda: a.commit(42, 0), lambda: a.block_table(42),
                 lambda: a.num_tokens(42), lambda: a.can_append(42), lambda: a.can_append_all([42]),
                 lambda: a.free(42)):
        with pytest.raises(ValueError, match="sequence 42 has no blocks"):
            call()


def test_commit_bounds():
    a = BlockAllocator(4, 16)
    a.allocate(0, tokens_of(20, 0))
    for n in (-1, 21):
        with pytest.raises(ValueError, match=f"cannot commit {n} of 20 known tokens"):
            a.commit(0, n)
    a.commit(0, 0)
    a.commit(0, 20)


# ---------------------------------------------------------------- model-input helpers


def test_fill_block_tables():
    a = BlockAllocator(8, 8)
    a.allocate(0, tokens_of(20, 0))  # blocks 0, 1, 2
    a.allocate(1, tokens_of(5, 1))   # block 3
    out = np.full((3, 4), 99, dtype=np.int32)
    a.fill_block_tables([1, 0], out)
    assert out.tolist() == [[3, -1, -1, -1], [0, 1, 2, -1], [99] * 4]
    a.fill_block_tables([0], out, pad=0)
    assert out[0].tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="out has 3 rows for 4 sequences"):
        a.fill_block_tables([0, 1, 0, 1], out)
    with pytest.raises(ValueError, match="sequence 0 has 3 blocks, out has 2 columns"):
        a.fill_block_tables([0], np.zeros((1, 2), dtype=np.int32))


def test_fill_slots():
    a = BlockAllocator(8, 8)
    a.allocate(9, tokens_of(3, 0))   # block 0
    a.allocate(0, tokens_of(20, 1))  # blocks 1, 2, 3
    out = np.full(30, -7, dtype=np.int64)
    a.fill_slots(0, 0, 20, out)
    table = a.block_table(0)
    assert out[:20].tolist() == [table[p // 8] * 8 + p % 8 for p in range(20)]
    a.fill_slots(0, 6, 10, out, offset=25)
    assert out[25:29].tolist() == [14, 15, 16, 17] and out[29] == -7
    a.fill_slots(0, 23, 24, out)  # the unused tail slots of the last block are addressable
    assert out[0] == 3 * 8 + 7
    with pytest.raises(ValueError, match="outside sequence 0's blocks"):
        a.fill_slots(0, 0, 25, out)
    with pytest.raises(ValueError, match="outside"):
        a.fill_slots(0, 5, 4, out)
    with pytest.raises(ValueError, match="out is too short"):
        a.fill_slots(0, 0, 20, out, offset=11)


def test_fill_decode_inputs():
    a = BlockAllocator(8, 8)
    a.allocate(0, tokens_of(8, 0))
    a.allocate(1, tokens_of(17, 1))
    a.append(0, 3)  # position 8: first slot of a new block
    pos = np.zeros(3, dtype=np.int64)
    slots = np.zeros(3, dtype=np.int64)
    lens = np.zeros(3, dtype=np.int32)
    a.fill_decode_inputs([1, 0], pos, slots, lens)
    t0, t1 = a.block_table(0), a.block_table(1)
    assert pos[:2].tolist() == [16, 8]
    assert slots[:2].tolist() == [t1[2] * 8 + 0, t0[1] * 8 + 0]
    assert lens[:2].tolist() == [17, 9]
    with pytest.raises(ValueError, match="shorter than the batch"):
        a.fill_decode_inputs([0, 1, 0, 1], pos, slots, lens)


def test_fill_outputs_reject_wrong_dtype():
    """An output array of the wrong dtype must raise, not be silently converted into a copy nobody reads."""
    a = BlockAllocator(4, 8)
    a.allocate(0, tokens_of(10, 0))
    with pytest.raises((TypeError, ValueError)):
        a.fill_block_tables([0], np.zeros((1, 2), dtype=np.int64))
    with pytest.raises((TypeError, ValueError)):
        a.fill_slots(0, 0, 10, np.zeros(10, dtype=np.int32))
    with pytest.raises((TypeError, ValueError)):
        a.fill_decode_inputs([0], np.zeros(1, dtype=np.int32), np.zeros(1, dtype=np.int64),
                             np.zeros(1, dtype=np.int32))


# ---------------------------------------------------------------- prefix caching


@pytest.mark.parametrize("bs", [8, 16, 32])
def test_committed_full_blocks_get_chained_hashes(bs):
    a = BlockAllocator(8, bs)
    prompt = tokens_of(3 * bs + bs // 2, 0)
    a.allocate(0, prompt)
    table = a.block_table(0)
    assert not any(a.is_cached(b) for b in table)  # nothing is cached before commit
    a.commit(0, bs + 3)
    assert [a.is_cached(b) for b in table] == [True, False, False, False]
    a.commit(0, len(prompt))
    expected = chain_hashes(prompt, bs)
    assert [a.block_hash(b) for b in table[:3]] == expected
    assert not a.is_cached(table[3])  # a partial block has no hash
    with pytest.raises(ValueError, match=f"block {table[3]} is not cached"):
        a.block_hash(table[3])
    # The chain: a block's hash depends on its parent's, so the same tokens at another depth hash differently.
    assert expected[1] != BlockAllocator.chain_hash(ROOT, prompt[bs:2 * bs])


def test_chain_hash_is_deterministic_and_sensitive():
    t = list(range(16))
    h = BlockAllocator.chain_hash(ROOT, t)
    assert h == BlockAllocator.chain_hash(ROOT, list(t))
    assert h != BlockAllocator.chain_hash(ROOT, t[::-1])
    assert h != BlockAllocator.chain_hash(1, t)
    assert 0 <= h < 2 ** 64


@pytest.mark.parametrize("bs", [8, 16])
def test_hit_shares_blocks_and_counts(bs):
    a = BlockAllocator(16, bs)
    prompt = tokens_of(3 * bs + 2, 0)
    a.allocate(0, prompt)
    a.commit(0, len(prompt))
    t0 = a.block_table(0)
    assert a.allocate(1, prompt) == 3 * bs
    t1 = a.block_table(1)
    assert t1[:3] == t0[:3] and t1[3] != t0[3]
    assert [a.ref_count(b) for b in t0] == [2, 2, 2, 1]
    assert a.ref_count(t1[3]) == 1
    assert a.num_free_blocks == 16 - 5
    # A prompt sharing only the first block plus different tokens hits one block.
    other = prompt[:bs] + tokens_of(bs + 1, 1)
    assert a.allocate(2, other) == bs
    assert a.block_table(2)[0] == t0[0] and a.ref_count(t0[0]) == 3
    s = a.stats
    assert s.query_tokens == 2 * len(prompt) + len(other)
    assert s.hit_tokens == 4 * bs
    assert s.evictions == 0
    a.free(1)
    assert [a.ref_count(b) for b in t0] == [2, 1, 1, 1]


def test_uncommitted_blocks_are_not_found():
    a = BlockAllocator(8, 16)
    prompt = tokens_of(40, 0)
    a.allocate(0, prompt)
    assert a.allocate(1, prompt) == 0
    assert set(a.block_table(0)).isdisjoint(a.block_table(1))


@pytest.mark.parametrize("bs", [8, 16])
@pytest.mark.parametrize("num_full,extra,cached_blocks", [(1, 0, 0), (2, 0, 1), (4, 0, 3), (2, 1, 2), (2, -1, 1)])
def test_last_prompt_token_is_always_computed(bs, num_full, extra, cached_blocks):
    a = BlockAllocator(16, bs)
    base = tokens_of(8 * bs, 0)
    a.allocate(0, base)
    a.commit(0, len(base))
    prompt = base[:num_full * bs + extra]
    cached = a.allocate(1, prompt)
    assert cached == cached_blocks * bs
    assert cached <= len(prompt) - 1 and cached % bs == 0
    assert a.block_table(1)[:cached_blocks] == a.block_table(0)[:cached_blocks]
    assert a.block_table(1)[cached_blocks] not in a.block_table(0)


def test_freed_blocks_stay_findable_and_are_revived():
    a = BlockAllocator(6, 8)
    prompt = tokens_of(20, 0)
    a.allocate(0, prompt)
    a.commit(0, 20)
    table = a.block_table(0)
    a.free(0)
    assert a.num_free_blocks == 6
    assert a.is_cached(table[0]) and a.is_cached(table[1]) and not a.is_cached(table[2])
    assert a.can_allocate(tokens_of(48, 5))  # all six blocks count as free, cached or not
    assert a.allocate(1, prompt) == 16
    assert a.block_table(1)[:2] == table[:2]
    assert a.ref_count(table[0]) == 1 and a.num_free_blocks == 3
    assert table[0] not in a.free_list() and table[1] not in a.free_list()
    assert a.stats.evictions == 0


def test_fit_counts_revived_blocks():
    a = BlockAllocator(4, 8)
    prompt = tokens_of(17, 0)
    a.allocate(0, prompt)
    a.commit(0, 17)
    a.free(0)
    a.allocate(1, tokens_of(9, 1))  # takes the uncached block 2 and block 3
    # prompt needs 3 blocks: 2 hits (both on the free list) + 1 new; the only free blocks ARE the hits.
    assert a.num_free_blocks == 2
    assert not a.can_allocate(prompt)
    with pytest.raises(OutOfBlocksError):
        a.allocate(2, prompt)
    assert a.is_cached(0) and a.is_cached(1) and a.num_free_blocks == 2


def test_eviction_order_exact():
    bs = 8
    a = BlockAllocator(10, bs)
    p = tokens_of(20, 1)   # blocks 0, 1 (full) + 2 (partial)
    q = tokens_of(24, 2)   # blocks 3, 4, 5 (all full)
    a.allocate(0, p)
    a.allocate(1, q)
    a.commit(0, 20)
    a.commit(1, 24)
    assert a.free_list() == [6, 7, 8, 9]
    a.free(0)  # tail first: 2 (uncached) to the head, then 1, 0 (cached) to the tail
    assert a.free_list() == [2, 6, 7, 8, 9, 1, 0]
    a.free(1)
    assert a.free_list() == [2, 6, 7, 8, 9, 1, 0, 5, 4, 3]
    # A cold prompt of 6 blocks takes the uncached blocks first, then the least recently freed cached one.
    a.allocate(2, tokens_of(48, 3))
    assert a.block_table(2) == [2, 6, 7, 8, 9, 1]
    assert a.stats.evictions == 1 and not a.is_cached(1)
    assert a.free_list() == [0, 5, 4, 3]
    # p's first block is still findable; its second is gone, and so its chain stops there.
    assert a.allocate(3, p) == 8 and a.block_table(3)[0] == 0
    assert a.block_table(3) == [0, 5, 4] and a.free_list() == [3]  # p's new blocks evicted 5, then 4
    assert a.stats.evictions == 3 and not a.is_cached(5) and not a.is_cached(4) and a.is_cached(3)
    a.commit(3, 20)
    assert a.block_hash(5) == chain_hashes(p, bs)[1]  # a reused block is hashed for its new contents
    a.free(2)  # never committed: all uncached, each pushed to the head (tail of the table first)
    assert a.free_list() == [2, 6, 7, 8, 9, 1, 3]
    # q's chain: block 3 is still there, but its second block (4) is gone, so the chain stops after one.
    assert a.allocate(4, q + [7]) == 8 and a.block_table(4) == [3, 2, 6, 7]


def test_revived_and_refreed_block_moves_to_lru_tail():
    a = BlockAllocator(6, 8)
    p, q = tokens_of(17, 1), tokens_of(17, 2)
    a.allocate(0, p)
    a.allocate(1, q)
    a.commit(0, 17)
    a.commit(1, 17)
    a.free(0)
    a.free(1)
    # p: blocks 0, 1, 2(partial); q: 3, 4, 5(partial). Frees push uncached to the head (LIFO) and cached to the tail.
    assert a.free_list() == [5, 2, 1, 0, 4, 3]
    a.allocate(2, p[:9])  # hits block 0 only, takes 5 for its last token
    a.free(2)
    assert a.free_list() == [5, 2, 1, 4, 3, 0]  # block 0 was used most recently: last to go


def test_decode_filled_blocks_become_cacheable():
    bs = 16
    a = BlockAllocator(8, bs)
    prompt = tokens_of(20, 0)
    a.allocate(0, prompt)
    a.commit(0, 20)
    generated = tokens_of(12, 1)
    for t in generated[:-1]:
        a.append(0, t)
    assert not a.is_cached(a.block_table(0)[1])
    a.append(0, generated[-1])  # block 1 is now full
    seq_tokens = prompt + generated
    assert a.is_cached(a.block_table(0)[1])
    assert a.block_hash(a.block_table(0)[1]) == chain_hashes(seq_tokens, bs)[1]
    a.append(0, 5)
    assert len(a.block_table(0)) == 3 and not a.is_cached(a.block_table(0)[2])
    assert a.allocate(1, seq_tokens + [1]) == 32
    assert a.block_table(1)[:2] == a.block_table(0)[:2]


def test_every_cached_block_stays_findable():
    """is_cached means "full, computed and findable by its chained hash" (block_allocator.h). Two sequences that
    fill identical blocks (the same prompt allocated twice before a commit, or the same tokens decoded twice)
    both get hashed. Once the newer copy is evicted, the older one must still serve a hit, or must not claim to
    be cached (it would also hold an LRU place that an uncached block deserves)."""
    a = BlockAllocator(4, 8)
    p = list(range(9))
    a.allocate(0, p)
    a.allocate(1, p)
    a.commit(0, 9)
    a.commit(1, 9)
    a.free(1)
    a.free(0)
    a.allocate(2, tokens_of(24, 5))  # three of the four blocks: one of the two copies is evicted
    a.free(2)
    holding_p = [b for b in range(4) if a.is_cached(b) and a.block_hash(b) == chain_hashes(p, 8)[0]]
    assert a.allocate(3, p) == (8 if holding_p else 0)


def test_prefix_caching_disabled():
    a = BlockAllocator(8, 16, enable_prefix_caching=False)
    assert not a.prefix_caching
    prompt = tokens_of(40, 0)
    a.allocate(0, prompt)
    a.commit(0, 40)
    for t in range(8):
        a.append(0, t)
    assert not any(a.is_cached(b) for b in range(8))
    assert a.allocate(1, prompt) == 0
    assert set(a.block_table(0)).isdisjoint(a.block_table(1))
    a.free(0)
    assert a.allocate(2, prompt) == 0
    s = a.stats
    assert (s.query_tokens, s.hit_tokens, s.evictions) == (0, 0, 0)


# ---------------------------------------------------------------- hash collisions


def test_all_hashes_collide_token_check_refuses():
    a = BlockAllocator(8, 8, hash_bits=0)
    p, q = tokens_of(9, 1), tokens_of(9, 2)
    a.allocate(0, p)
    a.commit(0, 9)
    assert a.block_hash(a.block_table(0)[0]) == 0
    assert a.allocate(1, q) == 0  # same hash, different tokens: no hit
    assert a.allocate(2, p) == 8  # same tokens: a hit
    assert a.block_table(2)[0] == a.block_table(0)[0]
    assert a.block_table(1)[0] != a.block_table(0)[0]


def find_colliding_block(block, bs, bits, seed):
    """Another token block whose root-level hash agrees with `block`'s in the low `bits` bits."""
    target = chain_hashes(block, bs, bits)[0]
    rng = random.Random(seed)
    while True:
        other = [rng.randrange(1000) for _ in range(bs)]
        if other != block and chain_hashes(other, bs, bits)[0] == target:
            return other


def test_collision_parent_chain_check_refuses_foreign_child():
    bs, bits = 8, 6
    a = BlockAllocator(16, bs, hash_bits=bits)
    A, B = tokens_of(bs, 1), tokens_of(bs, 2)
    A2 = find_colliding_block(A, bs, bits, 3)
    tail = [5, 6, 7]
    a.allocate(0, A + B + tail)  # registers A, then B (child of A)
    a.commit(0, 2 * bs + 3)
    a.allocate(1, A2 + tail)  # registers A2 under the same hash: it now owns that map entry
    a.commit(1, bs + 3)
    t0, t1 = a.block_table(0), a.block_table(1)
    assert a.block_hash(t0[0]) == a.block_hash(t1[0])
    # A2+B: hash(B | hash(A2)) == hash(B | hash(A)) finds block B with matching tokens, but B's KV was computed
    # after A, not A2: only the first block may be reused.
    assert chain_hashes(A2 + B, bs, bits) == chain_hashes(A + B, bs, bits)
    assert a.allocate(2, A2 + B + tail) == bs
    t2 = a.block_table(2)
    assert t2[0] == t1[0] and t2[1] != t0[1]
    # A's own chain is still findable beside A2 (same hash key): the token check picks A, and then B is A's child.
    assert a.allocate(3, A + B + tail) == 2 * bs
    assert a.block_table(3)[:2] == t0[:2]


# ---------------------------------------------------------------- property test


class AllocatorModel:
    """What the tests know about each live sequence, and the invariants checked after every operation."""

    def __init__(self, num_blocks, bs, hash_bits):
        self.a = BlockAllocator(num_blocks, bs, hash_bits=hash_bits)
        self.bs, self.hash_bits = bs, hash_bits
        self.tokens: dict[int, list[int]] = {}
        self.hashed: dict[int, int] = {}  # full blocks the allocator must have cached, per sequence

    def allocate(self, seq_id, prompt):
        a, bs = self.a, self.bs
        if not a.can_allocate(prompt):
            free_before = a.free_list()
            with pytest.raises(OutOfBlocksError):
                a.allocate(seq_id, prompt)
            assert a.free_list() == free_before
            return
        cached = a.allocate(seq_id, prompt)
        assert cached % bs == 0 and 0 <= cached <= len(prompt) - 1
        self.tokens[seq_id] = list(prompt)
        self.hashed[seq_id] = cached // bs

    def commit(self, seq_id, n):
        self.a.commit(seq_id, n)
        self.hashed[seq_id] = max(self.hashed[seq_id], n // self.bs)

    def append(self, seq_id, token):
        a, bs = self.a, self.bs
        if not a.can_append(seq_id):
            assert len(self.tokens[seq_id]) % bs == 0 and a.num_free_blocks == 0
            with pytest.raises(OutOfBlocksError):
                a.append(seq_id, token)
            return
        a.append(seq_id, token)
        self.tokens[seq_id].append(token)
        full = len(self.tokens[seq_id]) // bs
        if self.hashed[seq_id] == full - 1:  # a block filled by decode after its whole prefix was cached
            self.hashed[seq_id] = full

    def free(self, seq_id):
        self.a.free(seq_id)
        del self.tokens[seq_id], self.hashed[seq_id]

    def check(self):
        a, bs = self.a, self.bs
        holders: dict[int, list[tuple[int, int]]] = {}
        for sid, toks in self.tokens.items():
            table = a.block_table(sid)
            assert a.num_tokens(sid) == len(toks)
            assert len(table) == blocks_needed(len(toks), bs)
            for i, b in enumerate(table):
                holders.setdefault(b, []).append((sid, i))
            hashes = chain_hashes(toks, bs, self.hash_bits)
            for i in range(self.hashed[sid]):
                assert a.is_cached(table[i]) and a.block_hash(table[i]) == hashes[i]
        assert a.num_free_blocks + len(holders) == a.num_blocks
        free = a.free_list()
        assert len(free) == a.num_free_blocks and set(free).isdisjoint(holders)
        for b in range(a.num_blocks):
            assert a.ref_count(b) == len(holders.get(b, []))
        for b, hs in holders.items():
            if len(hs) > 1:
                (s0, i0), rest = hs[0], hs[1:]
                prefix = self.tokens[s0][:(i0 + 1) * bs]
                assert len(prefix) == (i0 + 1) * bs  # only full blocks are ever shared
                for s, i in rest:
                    assert i == i0 and self.tokens[s][:(i + 1) * bs] == prefix


def test_random_interleavings_keep_invariants():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    bs = 8
    prefixes = [[], [1, 2, 3, 0] * 4, [2, 0, 1, 1] * 5 + [3]]

    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    @hypothesis.given(data=st.data(), hash_bits=st.sampled_from([64, 3]), num_blocks=st.integers(6, 24))
    def run(data, hash_bits, num_blocks):
        m = AllocatorModel(num_blocks, bs, hash_bits)
        next_id = 0
        for _ in range(data.draw(st.integers(1, 60))):
            live = sorted(m.tokens)
            op = data.draw(st.sampled_from(["allocate", "commit", "append", "free"] if live else ["allocate"]))
            if op == "allocate":
                prompt = data.draw(st.sampled_from(prefixes)) + data.draw(
                    st.lists(st.integers(0, 2), min_size=1, max_size=3 * bs))
                m.allocate(next_id, prompt)
                next_id += 1
            else:
                sid = data.draw(st.sampled_from(live))
                if op == "commit":
                    m.commit(sid, data.draw(st.integers(0, len(m.tokens[sid]))))
                elif op == "append":
                    for _ in range(data.draw(st.integers(1, bs))):
                        m.append(sid, data.draw(st.integers(0, 2)))
                else:
                    m.free(sid)
            m.check()
        for sid in sorted(m.tokens):
            m.free(sid)
        m.check()
        assert m.a.num_free_blocks == m.a.num_blocks and m.a.num_sequences == 0

    run()


def test_reset_prefix_cache_forgets_every_block():
    a = BlockAllocator(8, 8)
    prompt = list(range(20))
    a.allocate(0, prompt)
    a.commit(0, 20)
    with pytest.raises(ValueError, match="still hold blocks"):
        a.reset_prefix_cache()
    a.free(0)
    assert any(a.is_cached(b) for b in range(8))
    a.reset_prefix_cache()
    assert not any(a.is_cached(b) for b in range(8))
    assert a.allocate(1, prompt) == 0
    assert a.num_free_blocks == 8 - 3
