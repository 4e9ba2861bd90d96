"""Plain PyTorch references of the nanovllm_cpp ops.

They define what each CUDA kernel must compute, and they are the ops' CPU implementations, so the engine
runs (and is tested) without a GPU. Arithmetic is fp32 whatever the storage dtype. Signatures match the
op schemas in csrc/torch_bindings.cpp: outputs are written in place.
"""

import torch


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[valid].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[valid].to(v_cache.dtype)


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    out.copy_(rms_norm_fp32(x, weight, eps))


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    residual.copy_(residual.float() + x.float())
    x.copy_(rms_norm_fp32(residual, weight, eps))


def silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    d = x.shape[-1] // 2
    out.copy_(torch.nn.functional.silu(x[..., :d].float()) * x[..., d:].float())


def copy_pinned(dst: torch.Tensor, src: torch.Tensor, nbytes: int) -> None:
    dst[:nbytes].copy_(src[:nbytes])


def gather_embedding(out: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> None:
    picked = torch.full_like(rows, -1)
    row_ok = (rows >= 0) & (rows < ids.numel())
    picked[row_ok] = ids[rows[row_ok]]
    valid = (picked >= 0) & (picked < weight.shape[0])
    out.zero_()
    out[valid] = weight[picked[valid]]


def rotary_cos_sin_cache(head_dim: int, max_position: int, base: float,
                         scaling: dict | None = None) -> torch.Tensor:
    """float32 [max_position, head_dim]: cos of each frequency in the first half, sin in the second."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None:
        inv_freq = _scale_frequencies(inv_freq, scaling)
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()


def _scale_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * torch.pi / inv_freq
        smooth = ((old_len / wavelen) - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(wavelen > old_len / low, inv_freq / factor,
                           torch.where(wavelen < old_len / high, inv_freq, smoothed))
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> None:
    cos, sin = cos_sin_cache[positions].float().unsqueeze(1).chunk(2, dim=-1)
    query.copy_(_rotate(query, cos, sin))
    key.copy_(_rotate(key, cos, sin))


def qk_norm_rotary_store(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None,
                         cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, eps: float) -> None:
    """The composition the fused kernel implements: per-head q/k norm (rounded to the dtype), rotary, cache store."""
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("qk_norm_rotary_store: pass both q_norm_weight and k_norm_weight or neither")
    if q_norm_weight is not None:
        rms_norm(query, query, q_norm_weight, eps)
        rms_norm(key, key, k_norm_weight, eps)
    rotary_embedding(positions, query, key, cos_sin_cache)
    store_kvcache(key, value, k_cache, v_cache, slot_mapping)


def paged_attention_decode(out: torch.Tensor, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           max_context_len: int, workspace: torch.Tensor) -> None:
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    lens = context_lens.long()
    live = lens > 0
    if not bool(live.any()):
        return
    width = int(lens.max()) + block_size - 1
    tables = block_tables[live, : width // block_size].long()
    keys = k_cache[tables.clamp(min=0)].flatten(1, 2).float()  # [n, tokens, kv_heads, head_dim]
    values = v_cache[tables.clamp(min=0)].flatten(1, 2).float()
    group = num_heads // num_kv_heads
    q = query[live].float().view(-1, num_kv_heads, group, head_dim)
    scores = torch.einsum("nhgd,nthd->nhgt", q, keys) * scale
    beyond = torch.arange(keys.shape[1], device=keys.device) >= lens[live].unsqueeze(1)  # [n, tokens]
    scores.masked_fill_(beyond[:, None, None, :], float("-inf"))
    attn = torch.einsum("nhgt,nthd->nhgd", scores.softmax(-1), values)
    out[live] = attn.reshape(-1, num_heads, head_dim).to(out.dtype)


def qk_norm_rotary_paged_attention(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                   positions: torch.Tensor, q_norm_weight: torch.Tensor | None,
                                   k_norm_weight: torch.Tensor | None, cos_sin_cache: torch.Tensor,
                                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                   block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                   max_context_len: int, workspace: torch.Tensor, eps: float) -> None:
    """The composition the fused kernel implements, on copies of query and key (the op leaves those as they are)."""
    query, key = query.clone(), key.clone()
    qk_norm_rotary_store(positions, query, key, value, q_norm_weight, k_norm_weight, cos_sin_cache, k_cache,
                         v_cache, slot_mapping, eps)
    paged_attention_decode(out, query, k_cache, v_cache, block_tables, context_lens, scale, max_context_len,
                           workspace)


def skinny_linear(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    out.copy_(x.float() @ weight.float().T)


def silu_mul_skinny_linear(out: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor) -> None:
    gate, up = gate_up.float().split(weight.shape[1], dim=-1)
    out.copy_((torch.nn.functional.silu(gate) * up) @ weight.float().T)


def add_rms_norm_skinny_linear(out: torch.Tensor, residual_out: torch.Tensor, x: torch.Tensor,
                               residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                               weight: torch.Tensor) -> None:
    residual_out.copy_(residual.float() + x.float())
    normed = rms_norm_fp32(residual_out, norm_weight, eps).to(x.dtype)
    out.copy_(normed.float() @ weight.float().T)


def rms_norm_skinny_linear(out: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                           weight: torch.Tensor) -> None:
    normed = rms_norm_fp32(x, norm_weight, eps).to(x.dtype)
    out.copy_(normed.float() @ weight.float().T)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit xor-shift-multiply hash on int64 lanes holding values < 2**32."""
    mask = 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
    return x ^ (x >> 16)


def sampling_uniforms(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 [rows, vocab] strictly inside (0, 1): a pure function of each row's key (< 2**32) and the
    vocabulary id, so a request's draws do not depend on the rest of the batch. 23 bits + 0.5 is exact in fp32."""
    vocab = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    bits = _mix32(_mix32(keys & 0xFFFFFFFF).unsqueeze(1) ^ ((vocab * 0x9E3779B1) & 0xFFFFFFFF))
    return ((bits >> 9).float() + 0.5) * (1.0 / 8388608.0)


def sample_tokens(out: torch.Tensor, logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor) -> None:
    """Greedy rows (temperature 0) take argmax(logits); the others the Gumbel-max sample
    argmax(logits * (1 / T) - log(-log(u))), u = sampling_uniforms(keys) (1 / T rounded to fp32 once per row, as
    the kernel does). NaN never wins; ties go to the lowest id."""
    x = logits.float().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    greedy = temperatures == 0
    inverse_temperatures = torch.where(greedy, 1.0, temperatures).float().reciprocal()
    scores = x * inverse_temperatures.unsqueeze(1) - torch.log(-torch.log(sampling_uniforms(keys, logits.shape[1])))
    out.copy_(torch.where(greedy, x.argmax(-1), scores.argmax(-1)))
