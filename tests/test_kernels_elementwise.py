"""CUDA kernels of store_kvcache, rms_norm, fused_add_rms_norm, rotary_embedding, qk_norm_rotary_store,
copy_pinned and gather_embedding against their references.

Each check draws fresh random inputs, poisons outputs with NaN where the op has a separate output, and compares
with nanovllm_cpp.reference (fp32 math): relative error ||out - ref|| / ||ref|| <= 1e-2 for bf16/fp16 and 1e-5 for
fp32; store_kvcache and the residual of fused_add_rms_norm must be bit-exact. Views of a fused qkv projection
cover the strided layouts the engine uses; "unaligned" views (odd token stride) force the scalar fallbacks.
The worst error per op and dtype is printed at the end of the module (run with -s to see it).
"""

import pytest
import torch

from nanovllm_cpp import ops, reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
HIDDEN_SIZES = [576, 769, 1024, 4096, 5125, 8192]
TOKEN_COUNTS = [1, 7, 83, 4096]
HEAD_DIMS = [64, 128]
LAYOUTS = ["contiguous", "qkv_view", "unaligned_qkv_view"]
EPS = 1e-6
Q_HEADS, KV_HEADS = 16, 8

worst_errors: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def print_worst_errors():
    yield
    if worst_errors:
        print("\nworst relative error vs reference (op, dtype):")
        for name, error in sorted(worst_errors.items()):
            print(f"  {name:<40} {error:.3e}")


def check_close(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not out.isnan().any(), f"{name}: output has NaN (an element was not written)"
    error = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    key = f"{name} {str(out.dtype).removeprefix('torch.')}"
    worst_errors[key] = max(worst_errors.get(key, 0.0), error)
    assert error <= TOLERANCE[out.dtype], f"{name}: relative error {error:.3e} > {TOLERANCE[out.dtype]:.0e}"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN poison compares equal to itself)."""
    return torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype]))


def qkv_views(tokens: int, head_dim: int, dtype: torch.dtype, layout: str, device: str = "cuda"):
    """(qkv storage, q, k, v) with q/k/v [tokens, heads, head_dim] as the engine gets them."""
    if layout == "contiguous":
        make = lambda heads: torch.randn(tokens, heads, head_dim, dtype=dtype, device=device)  # noqa: E731
        q, k, v = make(Q_HEADS), make(KV_HEADS), make(KV_HEADS)
        return None, q, k, v
    width = (Q_HEADS + 2 * KV_HEADS) * head_dim
    pad = 1 if layout == "unaligned_qkv_view" else 0
    qkv = torch.randn(tokens, width + pad, dtype=dtype, device=device)
    q = qkv[:, pad : pad + Q_HEADS * head_dim].view(tokens, Q_HEADS, head_dim)
    k = qkv[:, pad + Q_HEADS * head_dim : pad + (Q_HEADS + KV_HEADS) * head_dim].view(tokens, KV_HEADS, head_dim)
    v = qkv[:, pad + (Q_HEADS + KV_HEADS) * head_dim :].view(tokens, KV_HEADS, head_dim)
    return qkv, q, k, v


def norm_weight(hidden: int, dtype: torch.dtype, device: str = "cuda") -> torch.Tensor:
    return (torch.randn(hidden, device=device) * 0.2 + 1.0).to(dtype)


# ---------------------------------------------------------------------------------------------------- rms_norm


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
def test_rms_norm(tokens, hidden, dtype):
    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda") * 3
    weight = norm_weight(hidden, dtype)
    out = torch.full_like(x, float("nan"))
    ops.rms_norm(out, x, weight, EPS)
    check_close("rms_norm", out, reference.rms_norm_fp32(x, weight, EPS))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("layout", ["qkv_view", "unaligned_qkv_view"])
def test_rms_norm_per_head_on_qkv_views(layout, tokens, head_dim, dtype):
    """Qwen3's q/k norm: rows of head_dim inside strided views, into strided outputs and in place."""
    qkv, q, k, _ = qkv_views(tokens, head_dim, dtype, layout)
    out_qkv, out_q, out_k, out_v = qkv_views(tokens, head_dim, dtype, layout)
    out_qkv.fill_(float("nan"))
    q_weight, k_weight = norm_weight(head_dim, dtype), norm_weight(head_dim, dtype)
    ops.rms_norm(out_q, q, q_weight, EPS)
    ops.rms_norm(out_k, k, k_weight, EPS)
    q_ref, k_ref = reference.rms_norm_fp32(q, q_weight, EPS), reference.rms_norm_fp32(k, k_weight, EPS)
    check_close("rms_norm per-head q", out_q, q_ref)
    check_close("rms_norm per-head k", out_k, k_ref)
    assert out_v.isnan().all(), "rms_norm wrote outside its output view"

    v_before = qkv[:, -KV_HEADS * head_dim :].clone()
    ops.rms_norm(q, q, q_weight, EPS)
    ops.rms_norm(k, k, k_weight, EPS)
    check_close("rms_norm per-head in place", q, q_ref)
    check_close("rms_norm per-head in place", k, k_ref)
    assert same_bits(qkv[:, -KV_HEADS * head_dim :], v_before)


@requires_cuda
def test_rms_norm_leading_dims_and_empty():
    x = torch.randn(3, 5, 7, 256, dtype=torch.bfloat16, device="cuda")[:, 1:4]  # two row strides after merging
    weight = norm_weight(256, torch.bfloat16)
    out = torch.full_like(x, float("nan"))
    ops.rms_norm(out, x, weight, EPS)
    check_close("rms_norm", out, reference.rms_norm_fp32(x, weight, EPS))
    empty = torch.empty(0, 256, dtype=torch.bfloat16, device="cuda")
    ops.rms_norm(empty, empty, weight, EPS)


@requires_cuda
def test_rms_norm_rejects_bad_input():
    x = torch.randn(4, 1024, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        ops.rms_norm(out, x, torch.ones(1024, device="cuda"), EPS)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[1024\]"):
        ops.rms_norm(out, x, torch.ones(512, dtype=torch.bfloat16, device="cuda"), EPS)
    with pytest.raises(RuntimeError, match="hidden size 16384"):
        big = torch.randn(2, 16384, dtype=torch.bfloat16, device="cuda")
        ops.rms_norm(big, big, torch.ones(16384, dtype=torch.bfloat16, device="cuda"), EPS)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        ops.rms_norm(out.t(), x.t(), torch.ones(4, dtype=torch.bfloat16, device="cuda"), EPS)
    with pytest.raises(RuntimeError, match="two strides"):
        y = torch.randn(4, 4, 4, 64, dtype=torch.bfloat16, device="cuda")[::2, ::2, ::2]
        ops.rms_norm(torch.empty_like(y), y, torch.ones(64, dtype=torch.bfloat16, device="cuda"), EPS)


# ------------------------------------------------------------------------------------------ fused_add_rms_norm


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
def test_fused_add_rms_norm(tokens, hidden, dtype):
    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
    residual = torch.randn(tokens, hidden, dtype=dtype, device="cuda") * 4
    weight = norm_weight(hidden, dtype)
    x_ref, residual_ref = x.clone(), residual.clone()
    reference.fused_add_rms_norm(x_ref, residual_ref, weight, EPS)
    ops.fused_add_rms_norm(x, residual, weight, EPS)
    assert same_bits(residual, residual_ref), "residual must be the exactly rounded sum"
    check_close("fused_add_rms_norm", x, reference.rms_norm_fp32(residual_ref, weight, EPS))


@requires_cuda
def test_fused_add_rms_norm_rejects_bad_input():
    x = torch.randn(4, 1024, dtype=torch.bfloat16, device="cuda")
    weight = torch.ones(1024, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="residual has shape"):
        ops.fused_add_rms_norm(x, torch.randn(4, 512, dtype=torch.bfloat16, device="cuda"), weight, EPS)
    with pytest.raises(RuntimeError, match="residual has dtype"):
        ops.fused_add_rms_norm(x, x.float(), weight, EPS)


# ---------------------------------------------------------------------------------------------- store_kvcache


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_store_kvcache(layout, tokens, head_dim, dtype):
    _, _, key, value = qkv_views(tokens, head_dim, dtype, layout)
    block_size = 16
    num_blocks = 2 * tokens // block_size + 3
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:tokens]
    slots[torch.rand(tokens, device="cuda") < 0.2] = -1  # padding tokens
    k_cache = torch.full((num_blocks, block_size, KV_HEADS, head_dim), float("nan"), dtype=dtype, device="cuda")
    v_cache = torch.full_like(k_cache, float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.store_kvcache(key, value, k_ref, v_ref, slots)
    ops.store_kvcache(key, value, k_cache, v_cache, slots)
    assert same_bits(k_cache, k_ref) and same_bits(v_cache, v_ref)
    written = k_cache.view(-1, KV_HEADS, head_dim)[slots[slots >= 0]]
    assert not written.isnan().any()


@requires_cuda
def test_store_kvcache_rejects_bad_input():
    key = torch.randn(4, KV_HEADS, 64, dtype=torch.bfloat16, device="cuda")
    cache = torch.zeros(2, 16, KV_HEADS, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="slot_mapping must be a contiguous int64"):
        ops.store_kvcache(key, key, cache, cache.clone(), torch.arange(4, dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match="k_cache has dtype"):
        ops.store_kvcache(key, key, cache.half(), cache.half(), torch.arange(4, device="cuda"))
    with pytest.raises(RuntimeError, match="do not match the cache"):
        ops.store_kvcache(key[..., :32], key[..., :32], cache, cache.clone(), torch.arange(4, device="cuda"))


# ------------------------------------------------------------------------------------------- rotary_embedding


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rotary_embedding(layout, tokens, head_dim, dtype):
    max_position = 8192
    cos_sin_cache = reference.rotary_cos_sin_cache(head_dim, max_position, base=1e6).cuda()
    positions = torch.randint(0, max_position, (tokens,), device="cuda")
    qkv, query, key, value = qkv_views(tokens, head_dim, dtype, layout)
    value_before = value.clone()
    # fp32 copies (copy=True: .float() of an fp32 tensor is the tensor itself), so the reference stays unrounded
    query_ref, key_ref = query.to(torch.float32, copy=True), key.to(torch.float32, copy=True)
    reference.rotary_embedding(positions, query_ref, key_ref, cos_sin_cache)
    ops.rotary_embedding(positions, query, key, cos_sin_cache)
    check_close("rotary_embedding q", query, query_ref)
    check_close("rotary_embedding k", key, key_ref)
    assert same_bits(value, value_before), "rotary_embedding wrote outside query/key"


@requires_cuda
def test_rotary_embedding_rejects_bad_input():
    query = torch.randn(4, Q_HEADS, 64, dtype=torch.bfloat16, device="cuda")
    key = torch.randn(4, KV_HEADS, 64, dtype=torch.bfloat16, device="cuda")
    cache = reference.rotary_cos_sin_cache(64, 32, base=1e4).cuda()
    positions = torch.arange(4, device="cuda")
    with pytest.raises(RuntimeError, match="cos_sin_cache must be a contiguous float32"):
        ops.rotary_embedding(positions, query, key, cache[:, :32].contiguous())
    with pytest.raises(RuntimeError, match="positions must be a contiguous int64"):
        ops.rotary_embedding(positions.int(), query, key, cache)
    with pytest.raises(RuntimeError, match="key has dtype"):
        ops.rotary_embedding(positions, query, key.half(), cache)


# --------------------------------------------------------------------------------------- qk_norm_rotary_store


def fused_prologue_inputs(tokens: int, head_dim: int, dtype: torch.dtype, layout: str, with_norm: bool,
                          device: str = "cuda"):
    """Arguments of qk_norm_rotary_store with NaN-poisoned caches and ~20% padding slots (-1), plus the qkv storage."""
    max_position, block_size = 4096, 16
    qkv, query, key, value = qkv_views(tokens, head_dim, dtype, layout, device)
    positions = torch.randint(0, max_position, (tokens,), device=device)
    num_blocks = 2 * tokens // block_size + 3
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    slots[torch.rand(tokens, device=device) < 0.2] = -1
    k_cache = torch.full((num_blocks, block_size, KV_HEADS, head_dim), float("nan"), dtype=dtype, device=device)
    weights = (None, None)
    if with_norm:
        weights = (norm_weight(head_dim, dtype, device), norm_weight(head_dim, dtype, device))
    cos_sin_cache = reference.rotary_cos_sin_cache(head_dim, max_position, base=1e6).to(device)
    args = (positions, query, key, value, *weights, cos_sin_cache, k_cache, torch.full_like(k_cache, float("nan")),
            slots, EPS)
    return qkv, args


def fp32_prologue(args):
    """query and key after the reference composition in fp32 (no rounding between norm and rotary)."""
    positions, query, key, value, q_weight, k_weight, cos_sin_cache, k_cache, v_cache, slots, eps = args
    query_ref, key_ref = query.to(torch.float32, copy=True), key.to(torch.float32, copy=True)
    if q_weight is not None:
        query_ref, key_ref = (reference.rms_norm_fp32(query_ref, q_weight, eps),
                              reference.rms_norm_fp32(key_ref, k_weight, eps))
    reference.rotary_embedding(positions, query_ref, key_ref, cos_sin_cache)
    return query_ref, key_ref


def check_fused_prologue(name: str, qkv, args) -> None:
    positions, query, key, value, q_weight, k_weight, cos_sin_cache, k_cache, v_cache, slots, eps = args
    query_ref, key_ref = fp32_prologue(args)
    value_before = value.clone()
    qkv_before = None if qkv is None else qkv.clone()
    ops.qk_norm_rotary_store(*args)
    check_close(f"{name} q", query, query_ref)
    check_close(f"{name} k", key, key_ref)
    assert same_bits(value, value_before), "value must not change"
    if qkv is not None:  # the pad column of unaligned views and the value columns stay as they were
        untouched = torch.ones(qkv.shape[1], dtype=torch.bool, device=qkv.device)
        for view in (query, key):
            start = (view.data_ptr() - qkv.data_ptr()) // qkv.element_size()
            untouched[start : start + view.shape[1] * view.shape[2]] = False
        assert same_bits(qkv[:, untouched], qkv_before[:, untouched]), "wrote outside query/key"
    # The cache holds exactly the rotated key (the same bits as key) and value at live slots; NaN elsewhere.
    live = slots >= 0
    k_expected, v_expected = torch.full_like(k_cache, float("nan")), torch.full_like(v_cache, float("nan"))
    reference.store_kvcache(key[live], value[live], k_expected, v_expected, slots[live])
    assert same_bits(k_cache, k_expected) and same_bits(v_cache, v_expected), "cache rows differ from key/value"


@requires_cuda
@pytest.mark.parametrize("with_norm", [True, False], ids=["qk_norm", "no_norm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_qk_norm_rotary_store(layout, tokens, head_dim, dtype, with_norm):
    qkv, args = fused_prologue_inputs(tokens, head_dim, dtype, layout, with_norm)
    check_fused_prologue("qk_norm_rotary_store" + ("" if with_norm else " no norm"), qkv, args)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [32, 96, 256, 512])
@pytest.mark.parametrize("layout", ["qkv_view", "unaligned_qkv_view"])
def test_qk_norm_rotary_store_other_head_dims(layout, head_dim, dtype):
    """Groups that are not a power of two (96), several pairs per lane (512), the scalar path up to 512."""
    qkv, args = fused_prologue_inputs(37, head_dim, dtype, layout, with_norm=True)
    check_fused_prologue("qk_norm_rotary_store other head_dim", qkv, args)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rotary_store_matches_separate_ops(dtype):
    """The engine may use the fused op or rms_norm + rotary_embedding + store_kvcache: the same roundings, so
    they differ only where the order of the sum of squares moves one."""
    qkv, args = fused_prologue_inputs(512, 128, dtype, "qkv_view", with_norm=True)
    positions, query, key, value, q_weight, k_weight, cos_sin_cache, k_cache, v_cache, slots, eps = args
    separate = [t.clone() for t in (query, key, k_cache, v_cache)]
    ops.rms_norm(separate[0], separate[0], q_weight, eps)
    ops.rms_norm(separate[1], separate[1], k_weight, eps)
    ops.rotary_embedding(positions, separate[0], separate[1], cos_sin_cache)
    ops.store_kvcache(separate[1], value, separate[2], separate[3], slots)
    ops.qk_norm_rotary_store(*args)
    check_close("qk_norm_rotary_store vs separate ops q", query, separate[0].float())
    check_close("qk_norm_rotary_store vs separate ops k", key, separate[1].float())
    if dtype != torch.float32:  # one rounding step of the separate path's inv_rms rarely flips a 16-bit result
        for fused, alone in zip((query, key), separate[:2]):
            assert (fused != alone).float().mean() < 0.01
    assert same_bits(v_cache, separate[3])


@requires_cuda
def test_qk_norm_rotary_store_empty():
    _, args = fused_prologue_inputs(0, 128, torch.bfloat16, "qkv_view", with_norm=True)
    ops.qk_norm_rotary_store(*args)


@requires_cuda
def test_qk_norm_rotary_store_cuda_graph():
    """Captured once on static buffers, replayed on new data, positions and slots: the bits of an eager call."""
    qkv, args = fused_prologue_inputs(6, 128, torch.bfloat16, "qkv_view", with_norm=True)
    positions, _, _, _, q_weight, k_weight, _, k_cache, v_cache, slots, _ = args
    ops.qk_norm_rotary_store(*args)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.qk_norm_rotary_store(*args)

    new_qkv, new_args = fused_prologue_inputs(6, 128, torch.bfloat16, "qkv_view", with_norm=True)
    qkv.copy_(new_qkv)
    positions.copy_(new_args[0])
    slots.copy_(new_args[9])
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    graph.replay()
    ops.qk_norm_rotary_store(*new_args[:4], q_weight, k_weight, *new_args[6:])
    torch.cuda.synchronize()
    assert same_bits(qkv, new_qkv)
    assert same_bits(k_cache, new_args[7]) and same_bits(v_cache, new_args[8])


@requires_cuda
def test_qk_norm_rotary_store_rejects_bad_input():
    _, args = fused_prologue_inputs(4, 64, torch.bfloat16, "qkv_view", with_norm=True)
    positions, query, key, value, q_weight, k_weight, cache, k_cache, v_cache, slots, eps = args

    def call(**changes):
        named = dict(positions=positions, query=query, key=key, value=value, q_norm_weight=q_weight,
                     k_norm_weight=k_weight, cos_sin_cache=cache, k_cache=k_cache, v_cache=v_cache,
                     slot_mapping=slots, eps=eps)
        named.update(changes)
        ops.qk_norm_rotary_store(**named)

    with pytest.raises(RuntimeError, match="pass both q_norm_weight and k_norm_weight"):
        call(k_norm_weight=None)
    with pytest.raises(RuntimeError, match=r"k_norm_weight must be a contiguous \[64\]"):
        call(k_norm_weight=torch.ones(128, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(RuntimeError, match="q_norm_weight has dtype"):
        call(q_norm_weight=q_weight.float())
    with pytest.raises(RuntimeError, match="query has dtype Int"):
        call(query=query.int(), key=key.int(), value=value.int())
    with pytest.raises(RuntimeError, match="value has shape"):
        call(value=value[:, :4])
    with pytest.raises(RuntimeError, match="k_cache has dtype"):
        call(k_cache=k_cache.half(), v_cache=v_cache.half())
    with pytest.raises(RuntimeError, match="do not match the cache"):
        call(k_cache=k_cache[..., :32], v_cache=v_cache[..., :32])
    with pytest.raises(RuntimeError, match="slot_mapping must be a contiguous int64"):
        call(slot_mapping=slots.int())
    with pytest.raises(RuntimeError, match="positions must be a contiguous int64"):
        call(positions=positions[:2])
    with pytest.raises(RuntimeError, match="cos_sin_cache must be a contiguous float32"):
        call(cos_sin_cache=cache.double())
    with pytest.raises(RuntimeError, match="key must be a CUDA tensor"):
        call(key=key.cpu())
    with pytest.raises(RuntimeError, match="head_dim must be even and in 2..512"):
        big = torch.randn(4, Q_HEADS, 1024, dtype=torch.bfloat16, device="cuda")
        big_kv = torch.randn(4, KV_HEADS, 1024, dtype=torch.bfloat16, device="cuda")
        big_cache = torch.zeros(1, 16, KV_HEADS, 1024, dtype=torch.bfloat16, device="cuda")
        call(query=big, key=big_kv, value=big_kv, q_norm_weight=None, k_norm_weight=None,
             cos_sin_cache=reference.rotary_cos_sin_cache(1024, 8, base=1e4).cuda(), k_cache=big_cache,
             v_cache=big_cache.clone(), positions=torch.arange(4, device="cuda"))


def test_qk_norm_rotary_store_reference_is_the_composition():
    """On the CPU (CI) the op is its reference: exactly rms_norm in place, rotary_embedding, store_kvcache."""
    for with_norm in (True, False):
        _, args = fused_prologue_inputs(9, 64, torch.bfloat16, "qkv_view", with_norm, device="cpu")
        positions, query, key, value, q_weight, k_weight, cos_sin_cache, k_cache, v_cache, slots, eps = args
        expected = [t.clone() for t in (query, key, k_cache, v_cache)]
        if with_norm:
            ops.rms_norm(expected[0], expected[0], q_weight, eps)
            ops.rms_norm(expected[1], expected[1], k_weight, eps)
        ops.rotary_embedding(positions, expected[0], expected[1], cos_sin_cache)
        ops.store_kvcache(expected[1], value, expected[2], expected[3], slots)
        ops.qk_norm_rotary_store(*args)
        for got, want in zip((query, key, k_cache, v_cache), expected):
            assert same_bits(got, want)
    with pytest.raises(ValueError, match="both q_norm_weight and k_norm_weight"):
        ops.qk_norm_rotary_store(*args[:4], norm_weight(64, torch.bfloat16, "cpu"), None, *args[6:])


# ------------------------------------------------------------------------------------------------- copy_pinned


def pinned_bytes(nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8).pin_memory()


@requires_cuda
@pytest.mark.parametrize("nbytes", [0, 16, 4096, 300016])
def test_copy_pinned(nbytes):
    """The first nbytes arrive bit for bit, either way; the bytes behind them keep their poison."""
    src = pinned_bytes(nbytes + 64)
    dst = torch.full((nbytes + 64,), 0xA5, dtype=torch.uint8, device="cuda")
    ops.copy_pinned(dst, src, nbytes)
    torch.cuda.synchronize()
    assert torch.equal(dst[:nbytes].cpu(), src[:nbytes])
    assert (dst[nbytes:] == 0xA5).all()

    back = torch.full((nbytes + 64,), 0x5A, dtype=torch.uint8).pin_memory()
    dst.add_(1)  # written by a kernel just before: the copy must wait for it
    ops.copy_pinned(back, dst, nbytes)
    torch.cuda.synchronize()
    assert torch.equal(back[:nbytes], (src[:nbytes] + 1))
    assert (back[nbytes:] == 0x5A).all()


@requires_cuda
def test_copy_pinned_cuda_graph():
    """A replay reads the host buffer as it is at the replay, not as it was at the capture, and writes the host
    buffer again."""
    src, back = pinned_bytes(8192), torch.zeros(8192, dtype=torch.uint8).pin_memory()
    dst = torch.zeros(8192, dtype=torch.uint8, device="cuda")
    ops.copy_pinned(dst, src, 8192)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.copy_pinned(dst[1024:], src[1024:], 4096)
        ops.copy_pinned(back, dst, 8192)
    for _ in range(2):
        torch.cuda.synchronize()
        src.copy_(torch.randint(0, 256, (8192,), dtype=torch.uint8))
        dst.zero_()
        back.fill_(7)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(dst[1024:5120].cpu(), src[1024:5120])
        assert not dst[:1024].any() and not dst[5120:].any()
        assert torch.equal(back, dst.cpu())


@requires_cuda
def test_copy_pinned_rejects_bad_input():
    src, dst = pinned_bytes(256), torch.zeros(256, dtype=torch.uint8, device="cuda")
    with pytest.raises(RuntimeError, match="one pinned CPU tensor, got dst on cuda:0 and src on cpu"):
        ops.copy_pinned(dst, src.clone(), 64)
    with pytest.raises(RuntimeError, match="got dst on cuda:0 and src on cuda:0"):
        ops.copy_pinned(dst, dst.clone(), 64)
    with pytest.raises(RuntimeError, match=r"got dst on cpu and src on cuda:0"):
        ops.copy_pinned(src.clone(), dst, 64)
    with pytest.raises(RuntimeError, match="src must be a contiguous uint8 vector, got Int"):
        ops.copy_pinned(dst, src.view(torch.int32), 64)
    with pytest.raises(RuntimeError, match="dst must start on a 16-byte boundary"):
        ops.copy_pinned(src[8:], dst, 64)
    with pytest.raises(RuntimeError, match="nbytes = 24 must be a multiple of 16"):
        ops.copy_pinned(dst, src, 24)
    with pytest.raises(RuntimeError, match="nbytes = 272 must be a multiple of 16 within both buffers"):
        ops.copy_pinned(dst, src, 272)


# -------------------------------------------------------------------------------------------- gather_embedding


def gather_inputs(vocab: int, hidden: int, dtype: torch.dtype, device: str = "cuda"):
    """A weight, a table of ids (the last two out of the vocabulary) and rows into it (the last two out of the
    table): the rows' expected outputs are the embeddings of their ids, zero for the invalid ones."""
    weight = torch.randn(vocab, hidden, device=device).to(dtype)
    ids = torch.cat([torch.randint(0, vocab, (10,), device=device), torch.tensor([-1, vocab], device=device)])
    rows = torch.tensor([3, 0, 9, 3, 5, 10, 11, -1, 12], device=device)
    expected = torch.zeros(rows.numel(), hidden, device=device, dtype=dtype)
    expected[:5] = weight[ids[rows[:5]]]
    return weight, ids, rows, expected


@requires_cuda
@pytest.mark.parametrize("hidden", [8, 576, 1024, 5000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_embedding(dtype, hidden):
    """Bit for bit the rows F.embedding(ids[rows]) gives, zero rows for the invalid rows and ids."""
    weight, ids, rows, expected = gather_inputs(1000, hidden, dtype)
    out = torch.full_like(expected, float("nan"))
    ops.gather_embedding(out, weight, ids, rows)
    assert torch.equal(out.view(BITS[dtype]), expected.view(BITS[dtype]))
    cpu = torch.empty_like(out.cpu())
    ops.gather_embedding(cpu, weight.cpu(), ids.cpu(), rows.cpu())
    assert torch.equal(cpu, expected.cpu())


@requires_cuda
def test_gather_embedding_cuda_graph():
    """A replay reads the ids and rows as they are at the replay."""
    weight, ids, rows, _ = gather_inputs(1000, 1024, torch.bfloat16)
    out = torch.empty(rows.numel(), 1024, device="cuda", dtype=torch.bfloat16)
    ops.gather_embedding(out, weight, ids, rows)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.gather_embedding(out, weight, ids, rows)
    for _ in range(2):
        ids[:10].random_(0, 1000)
        rows[:5] = torch.randint(0, 10, (5,), device="cuda")
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[:5], weight[ids[rows[:5]]]) and not out[5:].any()


@requires_cuda
def test_gather_embedding_rejects_bad_input():
    weight, ids, rows, expected = gather_inputs(100, 64, torch.bfloat16)
    out = torch.empty_like(expected)
    cases = [
        ("a weight row must be a multiple of 16 bytes, got 10", (out[:, :5], weight[:, :5].contiguous(), ids, rows)),
        ("weight must be a contiguous", (out, weight.t().contiguous().t(), ids, rows)),
        ("ids must be a contiguous int64 vector, got Int", (out, weight, ids.int(), rows)),
        ("rows must be a contiguous int64 vector", (out, weight, ids, rows[::2])),
        (r"out must be a contiguous, 16-byte aligned BFloat16 \[9, 64\]", (out[:4], weight, ids, rows)),
        ("out must be a contiguous", (out.half(), weight, ids, rows)),
        ("rows must be a CUDA tensor", (out, weight, ids, rows.cpu())),
    ]
    for message, args in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.gather_embedding(*args)


# ------------------------------------------------------------------------------------------------- opcheck


def _devices():
    return ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.mark.parametrize("device", _devices())
def test_opcheck_store_kvcache(device):
    key = torch.randn(5, 2, 64, device=device, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    k_cache = torch.zeros(3, 4, 2, 64, device=device, dtype=torch.bfloat16)
    slots = torch.tensor([0, 5, -1, 11, 2], device=device)
    torch.library.opcheck(torch.ops.nanovllm_cpp.store_kvcache.default,
                          (key, value, k_cache, k_cache.clone(), slots))


@pytest.mark.parametrize("device", _devices())
def test_opcheck_rms_norm(device):
    x = torch.randn(6, 256, device=device, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.nanovllm_cpp.rms_norm.default,
                          (torch.empty_like(x), x, norm_weight(256, x.dtype, device), EPS))


@pytest.mark.parametrize("device", _devices())
def test_opcheck_fused_add_rms_norm(device):
    x = torch.randn(6, 256, device=device, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.nanovllm_cpp.fused_add_rms_norm.default,
                          (x, torch.randn_like(x), norm_weight(256, x.dtype, device), EPS))


@pytest.mark.parametrize("device", _devices())
def test_opcheck_rotary_embedding(device):
    _, query, key, _ = qkv_views(5, 64, torch.bfloat16, "qkv_view", device)
    cache = reference.rotary_cos_sin_cache(64, 32, base=1e4).to(device)
    positions = torch.randint(0, 32, (5,), device=device)
    torch.library.opcheck(torch.ops.nanovllm_cpp.rotary_embedding.default, (positions, query, key, cache))


@pytest.mark.parametrize("with_norm", [True, False], ids=["qk_norm", "no_norm"])
@pytest.mark.parametrize("device", _devices())
def test_opcheck_qk_norm_rotary_store(device, with_norm):
    _, args = fused_prologue_inputs(5, 64, torch.bfloat16, "qkv_view", with_norm, device)
    k_cache, v_cache = args[7], args[8]
    k_cache.zero_()  # opcheck compares the outputs of several runs: no NaN poison
    v_cache.zero_()
    torch.library.opcheck(torch.ops.nanovllm_cpp.qk_norm_rotary_store.default, args)


@pytest.mark.parametrize("device", _devices())
def test_opcheck_gather_embedding(device):
    weight, ids, rows, expected = gather_inputs(100, 64, torch.bfloat16, device)
    torch.library.opcheck(torch.ops.nanovllm_cpp.gather_embedding.default,
                          (torch.zeros_like(expected), weight, ids, rows))


def test_opcheck_copy_pinned():
    """The CPU case only: opcheck runs the op on copies of its inputs, and a copy of pinned memory is not pinned,
    so the CUDA case goes through torch.compile instead (test_copy_pinned_compiles)."""
    src = torch.randint(0, 256, (512,), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.nanovllm_cpp.copy_pinned.default, (torch.zeros(512, dtype=torch.uint8), src, 256))


@requires_cuda
def test_copy_pinned_compiles():
    """torch.compile traces the op through its fake impl and runs it on the real pinned buffer."""
    src, dst = pinned_bytes(512), torch.zeros(512, dtype=torch.uint8, device="cuda")
    compiled = torch.compile(lambda d, s: ops.copy_pinned(d, s, 256), backend="aot_eager", fullgraph=True)
    compiled(dst, src)
    torch.cuda.synchronize()
    assert torch.equal(dst[:256].cpu(), src[:256]) and not dst[256:].any()
