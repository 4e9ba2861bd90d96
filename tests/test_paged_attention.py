"""paged_attention_decode: the PyTorch reference against a naive loop (CPU, runs in CI), and the CUDA kernel
against the reference (GPU): poisoned outputs and caches, GQA groups, head dims, block sizes, long and mixed
contexts, split and unsplit launches, CUDA-graph replay, opcheck and input validation. Every GPU case also runs
qk_norm_rotary_paged_attention, decode with the attention prologue fused in, against the prologue kernel
(qk_norm_rotary_store) followed by the reference."""

import functools
import math
from dataclasses import dataclass

import pytest
import torch

from nanovllm_cpp import ops, reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}
# The fused prologue sums each head's squares in another order than qk_norm_rotary_store: a cached element may
# round one step apart.
ONE_ROUNDING = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 1e-6}
EPS = 1e-6
WORST_ERROR: dict[torch.dtype, float] = {}


@dataclass
class Case:
    out: torch.Tensor           # poisoned with NaN before every run
    query: torch.Tensor         # a strided view: the q part of a fused [num_seqs, q + 2 kv heads, dim] tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    scale: float
    max_context_len: int
    workspace: torch.Tensor
    poison: float
    key: torch.Tensor           # the fused prologue's inputs: the k and v parts of the same tensor as query,
    value: torch.Tensor
    positions: torch.Tensor     # each sequence's new token (index context_len - 1): its position and cache slot
    slots: torch.Tensor
    q_norm_weight: torch.Tensor | None
    k_norm_weight: torch.Tensor | None
    cos_sin_cache: torch.Tensor

    def args(self):
        return (self.out, self.query, self.k_cache, self.v_cache, self.block_tables, self.context_lens, self.scale,
                self.max_context_len, self.workspace)

    def prologue_args(self, query, key, k_cache, v_cache):
        return (self.positions, query, key, self.value, self.q_norm_weight, self.k_norm_weight, self.cos_sin_cache,
                k_cache, v_cache, self.slots, EPS)

    def fused_args(self):
        return (self.out, self.query, self.key, self.value, self.positions, self.q_norm_weight, self.k_norm_weight,
                self.cos_sin_cache, self.k_cache, self.v_cache, self.slots, self.block_tables, self.context_lens,
                self.scale, self.max_context_len, self.workspace, EPS)

    def fill(self, lens: list[int], generator: torch.Generator) -> None:
        """Writes fresh random q/K/V for these lengths into the existing tensors, on freshly shuffled blocks.

        Cache slots past each length, unused blocks and the table's unused entries (which point at a block
        holding only poison) are `poison`, so any read beyond a sequence's end shows up in the output.
        """
        num_blocks, block_size, num_kv_heads, head_dim = self.k_cache.shape
        device = self.k_cache.device
        self.k_cache.fill_(self.poison)
        self.v_cache.fill_(self.poison)
        order = torch.randperm(num_blocks, generator=generator)
        poison_block = int(order[-1])
        tables = torch.full(self.block_tables.shape, poison_block, dtype=torch.int32)
        slots, next_block, last_slots = [], 0, []
        for seq, length in enumerate(lens):
            blocks = order[next_block: next_block + -(-length // block_size)]
            assert next_block + len(blocks) < num_blocks, "case capacity too small"
            next_block += len(blocks)
            tables[seq, : len(blocks)] = blocks.int()
            tokens = torch.arange(length)
            slots.append(blocks[tokens // block_size] * block_size + tokens % block_size)
            last_slots.append(int(slots[-1][-1]) if length else -1)
        slots = torch.cat(slots).to(device) if slots else torch.zeros(0, dtype=torch.long, device=device)
        shape = (len(slots), num_kv_heads, head_dim)
        dtype = self.k_cache.dtype
        self.k_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(shape, generator=generator).to(device, dtype)
        self.v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(shape, generator=generator).to(device, dtype)
        self.block_tables.copy_(tables)
        self.context_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        self.query.copy_(torch.randn(self.query.shape, generator=generator))
        self.key.copy_(torch.randn(self.key.shape, generator=generator))
        self.value.copy_(torch.randn(self.value.shape, generator=generator))
        self.positions.copy_(torch.tensor(lens).clamp(min=1) - 1)
        self.slots.copy_(torch.tensor(last_slots, dtype=torch.long))
        self.out.fill_(float("nan"))


@functools.cache
def cos_sin_cache(head_dim: int, device: str) -> torch.Tensor:
    return reference.rotary_cos_sin_cache(head_dim, 40960, 1e6).to(device)


def make_case(lens: list[int], *, num_q_heads=16, num_kv_heads=8, head_dim=128, block_size=16,
              dtype=torch.bfloat16, device="cuda", max_context_len=None, capacity_blocks=None, poison=float("nan"),
              seed=0, qk_norm=None) -> Case:
    """qk_norm: whether the fused prologue normalises q and k (Qwen3) or only rotates them (Llama); by default
    every other seed."""
    generator = torch.Generator().manual_seed(seed)
    max_context_len = max(lens) if max_context_len is None else max_context_len
    width = max(1, -(-max_context_len // block_size))
    needed = sum(-(-n // block_size) for n in lens)
    num_blocks = capacity_blocks or needed + 17  # spare blocks stay poison; the last of the shuffle is the table pad
    fused = torch.empty(len(lens), num_q_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    case = Case(
        out=torch.empty(len(lens), num_q_heads, head_dim, dtype=dtype, device=device),
        query=fused[:, :num_q_heads],
        k_cache=torch.empty(cache_shape, dtype=dtype, device=device),
        v_cache=torch.empty(cache_shape, dtype=dtype, device=device),
        block_tables=torch.empty(len(lens), width, dtype=torch.int32, device=device),
        context_lens=torch.empty(len(lens), dtype=torch.int32, device=device),
        scale=head_dim ** -0.5,
        max_context_len=max_context_len,
        workspace=ops.paged_attention_workspace(len(lens), num_q_heads, head_dim, max_context_len, device),
        poison=poison,
        key=fused[:, num_q_heads: num_q_heads + num_kv_heads],
        value=fused[:, num_q_heads + num_kv_heads:],
        positions=torch.empty(len(lens), dtype=torch.long, device=device),
        slots=torch.empty(len(lens), dtype=torch.long, device=device),
        q_norm_weight=None,
        k_norm_weight=None,
        cos_sin_cache=cos_sin_cache(head_dim, device),
    )
    if (seed % 2 == 0) if qk_norm is None else qk_norm:
        case.q_norm_weight, case.k_norm_weight = (
            (1 + 0.2 * torch.randn(head_dim, generator=generator)).to(device, dtype) for _ in range(2))
    case.fill(lens, generator)
    return case


def expected(case: Case, query=None, k_cache=None, v_cache=None) -> torch.Tensor:
    """The reference in fp32 on the case's inputs (or these), poison zeroed (the reference's masked softmax still
    multiplies the poisoned values by 0, and NaN * 0 is NaN)."""
    query = case.query if query is None else query
    k_cache = case.k_cache if k_cache is None else k_cache
    v_cache = case.v_cache if v_cache is None else v_cache
    out = torch.zeros(case.out.shape, dtype=torch.float32, device=case.out.device)
    reference.paged_attention_decode(out, query.float(), k_cache.float().nan_to_num(), v_cache.float().nan_to_num(),
                                     case.block_tables, case.context_lens, case.scale, case.max_context_len,
                                     case.workspace)
    return out


def check(case: Case, ref: torch.Tensor | None = None) -> float:
    """Compares the kernel's out with the reference; padding rows must still hold the NaN poison."""
    ref = expected(case) if ref is None else ref
    live = case.context_lens > 0
    got = case.out.float()
    assert torch.isnan(got[~live]).all(), "a padding row (context_len 0) was written"
    assert not torch.isnan(got[live]).any(), "NaN in a live row (unwritten, or read past a sequence's end)"
    if not bool(live.any()):
        return 0.0
    error = float((got[live] - ref[live]).norm() / ref[live].norm())
    dtype = case.out.dtype
    WORST_ERROR[dtype] = max(WORST_ERROR.get(dtype, 0.0), error)
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g} > {TOLERANCE[dtype]}"
    return error


@dataclass
class FusedExpectation:
    out: torch.Tensor      # the fp32 reference over the prologue kernel's q and cache
    k_cache: torch.Tensor  # the cache after the prologue kernel
    v_cache: torch.Tensor
    query: torch.Tensor    # the raw projections, which the fused op must leave as they are
    key: torch.Tensor


def fused_expectation(case: Case) -> FusedExpectation:
    """What qk_norm_rotary_paged_attention must do to the case: qk_norm_rotary_store (on copies), then attention."""
    query, key = case.query.clone(), case.key.clone()
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    ops.qk_norm_rotary_store(*case.prologue_args(query, key, k_cache, v_cache))
    return FusedExpectation(expected(case, query, k_cache, v_cache), k_cache, v_cache, case.query.clone(),
                            case.key.clone())


def check_fused_result(case: Case, want: FusedExpectation) -> float:
    """out against the reference, the cache against the prologue kernel's, q and k untouched, and the split
    counters back at zero."""
    error = check(case, want.out)
    rounding = ONE_ROUNDING[case.out.dtype]
    for name, got, cache in (("k_cache", case.k_cache, want.k_cache), ("v_cache", case.v_cache, want.v_cache)):
        torch.testing.assert_close(got, cache, rtol=rounding, atol=rounding, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert torch.equal(case.query, want.query) and torch.equal(case.key, want.key), "query or key was written"
    num_counters = case.k_cache.shape[2] * len(case.context_lens)
    assert not case.workspace.view(torch.int32)[-num_counters:].any(), "a split counter was left non-zero"
    return error


def check_fused(case: Case) -> float:
    want = fused_expectation(case)
    case.out.fill_(float("nan"))
    ops.qk_norm_rotary_paged_attention(*case.fused_args())
    return check_fused_result(case, want)


def run_and_check(case: Case) -> float:
    ops.paged_attention_decode(*case.args())
    error = check(case)
    check_fused(case)
    return error


# ---- CPU: the reference itself (runs in CI) ----------------------------------------------------------------------

def naive_paged_attention(query, k_cache, v_cache, block_tables, context_lens, scale):
    """One sequence and one head at a time, token by token through the block table, in float64."""
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.full(query.shape, float("nan"), dtype=torch.float64)
    for seq in range(num_seqs):
        length = int(context_lens[seq])
        if length == 0:
            continue
        blocks = [int(block_tables[seq, t // block_size]) for t in range(length)]
        for head in range(num_heads):
            kv = head // group
            keys = torch.stack([k_cache[b, t % block_size, kv] for t, b in enumerate(blocks)]).double()
            values = torch.stack([v_cache[b, t % block_size, kv] for t, b in enumerate(blocks)]).double()
            weights = torch.softmax(keys @ query[seq, head].double() * scale, dim=0)
            out[seq, head] = weights @ values
    return out


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,block_size", [(4, 4, 64, 16), (16, 8, 128, 16),
                                                                           (8, 2, 64, 32), (6, 1, 128, 64)])
def test_reference_matches_naive_loop(num_q_heads, num_kv_heads, head_dim, block_size):
    # Finite garbage beyond each length: the reference multiplies masked values by 0, which NaN would survive.
    lens = [1, 0, 37, block_size, 3 * block_size + 5, 0, 100]
    case = make_case(lens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     block_size=block_size, dtype=torch.float32, device="cpu", max_context_len=260, poison=1e4)
    ops.paged_attention_decode(*case.args())  # CPU tensors dispatch to the reference
    want = naive_paged_attention(case.query, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                 case.scale)
    live = case.context_lens > 0
    assert torch.isnan(case.out[~live]).all()
    torch.testing.assert_close(case.out[live].double(), want[live], rtol=1e-5, atol=1e-5)


def test_cpu_opcheck():
    case = make_case([5, 0, 40], num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32, device="cpu",
                     poison=0.0)
    case.out.zero_()
    torch.library.opcheck(torch.ops.nanovllm_cpp.paged_attention_decode.default, case.args())


def test_cpu_opcheck_fused_prologue():
    case = make_case([5, 0, 40], num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32, device="cpu",
                     poison=0.0, qk_norm=True)
    case.out.zero_()
    torch.library.opcheck(torch.ops.nanovllm_cpp.qk_norm_rotary_paged_attention.default, case.fused_args())


def test_workspace_stays_modest():
    # 512 sequences x 16 heads x head_dim 128 at a 40960-token context: the split is capped, not per token.
    size = ops.paged_attention_workspace_size(512, 16, 128, 40960)
    assert size * 4 <= 64 * 2**20
    assert ops.paged_attention_workspace_size(1, 16, 128, 32768) == 513 * 16 * 131
    assert ops.paged_attention_workspace_size(8, 16, 128, 100) >= ops.paged_attention_workspace_size(1, 16, 128, 100)


# ---- GPU: the kernel against the reference -----------------------------------------------------------------------

def mixed_lengths(num_seqs: int, longest: int, seed: int) -> list[int]:
    """Random lengths in [1, longest], including 1, `longest`, non-multiples of any block size, and padding."""
    generator = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, longest + 1, (num_seqs,), generator=generator).tolist()
    lens[0] = longest
    if num_seqs > 2:
        lens[1] = 1
        lens[-1] = 0
    return lens


@requires_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 6, 7, 8])
def test_gqa_groups_and_head_dims(head_dim, group):
    num_kv_heads = 2 if group > 4 else 4
    case = make_case(mixed_lengths(9, 1500, seed=group), num_q_heads=group * num_kv_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, seed=head_dim + group)
    run_and_check(case)


@requires_cuda
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("num_seqs", [3, 300])  # split-K (few sequences) and one partition (many)
def test_block_sizes(block_size, num_seqs):
    case = make_case(mixed_lengths(num_seqs, 700, seed=block_size), block_size=block_size, seed=num_seqs)
    run_and_check(case)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dtypes(dtype, head_dim):
    for num_seqs in (4, 300):
        run_and_check(make_case(mixed_lengths(num_seqs, 900, seed=num_seqs), head_dim=head_dim, dtype=dtype))


@requires_cuda
@pytest.mark.parametrize("lens", [[1], [32768], [32768, 1, 0, 20001, 4097], [33000, 2]])
def test_long_contexts(lens):
    run_and_check(make_case(lens, seed=len(lens)))


@requires_cuda
@pytest.mark.parametrize("num_seqs", [1, 2, 17, 64, 511, 512])
def test_batch_sizes_over_thousands_of_blocks(num_seqs):
    longest = max(64, 40000 // num_seqs)
    case = make_case(mixed_lengths(num_seqs, longest, seed=num_seqs), capacity_blocks=6000, seed=num_seqs)
    run_and_check(case)


@requires_cuda
@pytest.mark.parametrize("num_seqs,longest", [(1, 1000), (4, 3000), (64, 500), (300, 200)])
def test_max_context_len_far_beyond_actual(num_seqs, longest):
    # The CUDA-graph case: max_context_len is the model's limit, the real lengths are far shorter.
    case = make_case(mixed_lengths(num_seqs, longest, seed=longest), max_context_len=40960, seed=num_seqs)
    run_and_check(case)


@requires_cuda
@pytest.mark.parametrize("lens", [[1], [64], [65], [128], [511], [2048], [2048, 64, 1, 0, 700], [900] * 16])
def test_short_partitions_of_the_decode_graph(lens):
    # The engine's decode graph: few sequences and max_context_len 2048, so partitions are as short as 64 tokens
    # and a sequence ends inside, or exactly at the end of, its first to 32nd partition.
    run_and_check(make_case(lens, max_context_len=2048, seed=sum(lens)))


@requires_cuda
@pytest.mark.parametrize("max_context_len", [None, 40960])
def test_long_sequence_in_large_batch(max_context_len):
    # Enough sequences to fill the GPU unsplit (40 x 8 kv heads >= 2 per SM); only the long ones are split (and
    # reduced), the rest write directly. (The fp32 reference gathers every sequence to the longest: keep it small.)
    lens = mixed_lengths(40, 300, seed=9)
    lens[7], lens[20] = 20000, 4097
    run_and_check(make_case(lens, max_context_len=max_context_len, seed=9))


@requires_cuda
def test_all_padding_and_zero_max_context():
    case = make_case([0, 0, 0])
    ops.paged_attention_decode(*case.args())
    assert torch.isnan(case.out).all()


@requires_cuda
@pytest.mark.parametrize("num_seqs", [6, 256])
def test_cuda_graph_replay_with_new_contents(num_seqs):
    max_context_len = 4096
    case = make_case(mixed_lengths(num_seqs, 3000, seed=1), max_context_len=max_context_len,
                     capacity_blocks=num_seqs * max_context_len // 16 + 1, seed=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.paged_attention_decode(*case.args())
    torch.cuda.current_stream().wait_stream(stream)
    check(case)
    graph, fused_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_attention_decode(*case.args())
    with torch.cuda.graph(fused_graph):
        ops.qk_norm_rotary_paged_attention(*case.fused_args())
    generator = torch.Generator().manual_seed(2)
    for seed in (3, 4):
        lens = mixed_lengths(num_seqs, 4096 if seed == 3 else 200, seed=seed)
        case.fill(lens, generator)  # new lengths, tables, q/K/V, and NaN in out: same addresses
        graph.replay()
        torch.cuda.synchronize()
        check(case)
        want = fused_expectation(case)
        case.out.fill_(float("nan"))
        fused_graph.replay()
        torch.cuda.synchronize()
        check_fused_result(case, want)


@requires_cuda
@pytest.mark.parametrize("num_seqs", [2, 300])
def test_cuda_opcheck(num_seqs):
    case = make_case(mixed_lengths(num_seqs, 600, seed=5)[:-1] + [7], poison=0.0)
    case.out.zero_()
    torch.library.opcheck(torch.ops.nanovllm_cpp.paged_attention_decode.default, case.args())
    torch.library.opcheck(torch.ops.nanovllm_cpp.qk_norm_rotary_paged_attention.default, case.fused_args())


@requires_cuda
def test_rejects_bad_inputs():
    case = make_case([100, 5])
    args = list(case.args())
    with pytest.raises(RuntimeError, match="workspace holds"):
        ops.paged_attention_decode(*args[:-1], case.workspace[:-1])
    with pytest.raises(RuntimeError, match="block_tables must be int32"):
        ops.paged_attention_decode(*args[:4], case.block_tables.long(), *args[5:])
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        ops.paged_attention_decode(case.out[:, :12], case.query[:, :12], *args[2:])
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        ops.paged_attention_decode(case.out[..., :96], case.query[..., :96], case.k_cache[..., :96].contiguous(),
                                   case.v_cache[..., :96].contiguous(), *args[4:])
    with pytest.raises(RuntimeError, match="dtype must equal"):
        ops.paged_attention_decode(*args[:2], case.k_cache.half(), case.v_cache.half(), *args[4:])
    fused = list(case.fused_args())
    for index, bad, message in ((2, case.key[:, :1], "key must be"), (3, case.value.half(), "value dtype"),
                                (4, case.positions.int(), "positions must be contiguous int64"),
                                (10, case.slots[:1], "slot_mapping must be contiguous int64"),
                                (5, None, "pass both q_norm_weight and k_norm_weight"),
                                (7, case.cos_sin_cache[:, :64], "cos_sin_cache must be"),
                                (15, case.workspace[:-1], "workspace holds")):
        with pytest.raises(RuntimeError, match=message):
            ops.qk_norm_rotary_paged_attention(*fused[:index], bad, *fused[index + 1:])


@requires_cuda
def test_report_worst_error():
    """Runs last in this file: prints the worst relative error seen per dtype (pytest -s)."""
    assert all(math.isfinite(e) for e in WORST_ERROR.values())
    print("\nworst relative error vs fp32 reference:",
          ", ".join(f"{str(d).removeprefix('torch.')}={e:.2e}" for d, e in WORST_ERROR.items()))
