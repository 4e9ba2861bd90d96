// The one place the nanovllm_cpp ops are declared. CUDA implementations register under
// TORCH_LIBRARY_IMPL(nanovllm_cpp, CUDA, ...) in csrc/*_cuda.cpp; the CPU implementations are the PyTorch
// references in nanovllm_cpp/reference.py, registered from Python.
//
// KV cache layout (one tensor for keys, one for values, per layer):
//   [num_blocks, block_size, num_kv_heads, head_dim], contiguous.
// A token's slot is block_id * block_size + offset; slot -1 marks padding.
#include <torch/library.h>

TORCH_LIBRARY(nanovllm_cpp, m) {
  // k_cache/v_cache[slot_mapping[t]] = key/value[t] for every t with slot_mapping[t] >= 0.
  // key, value: [num_tokens, num_kv_heads, head_dim] (token stride free); slot_mapping: int64 [num_tokens].
  m.def("store_kvcache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  // out = x / sqrt(mean(x^2, -1) + eps) * weight over the last dim; x: [..., hidden] with a contiguous last dim.
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  // residual += x; x = rms_norm(residual) * weight, both in place.
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  // NeoX (rotate-half) rotary embedding in place. query: [num_tokens, num_q_heads, head_dim],
  // key: [num_tokens, num_kv_heads, head_dim] (token strides free); positions: int64 [num_tokens];
  // cos_sin_cache: float32 [max_position, head_dim] holding cos in the first half and sin in the second.
  m.def("rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor cos_sin_cache) -> ()");
  // The attention prologue in one launch: if q_norm_weight/k_norm_weight are given (both or neither; Qwen3),
  // query/key = rms_norm per head ([head_dim] weights, eps), rounded to the dtype; then rotary_embedding of query
  // and key in place; then store_kvcache(key, value, k_cache, v_cache, slot_mapping). Shapes as in those ops;
  // value: [num_tokens, num_kv_heads, head_dim] (token stride free).
  m.def(
      "qk_norm_rotary_store(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor value, "
      "Tensor? q_norm_weight, Tensor? k_norm_weight, Tensor cos_sin_cache, Tensor(c!) k_cache, Tensor(d!) v_cache, "
      "Tensor slot_mapping, float eps) -> ()");
  // The gated MLP's activation: out = silu(x[:, :d]) * x[:, d:], in fp32, rounded once. x: [tokens, 2 * d],
  // out: [tokens, d], last dims contiguous (row strides free).
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  // dst[:nbytes] = src[:nbytes] between a CUDA and a pinned CPU tensor, either way (contiguous uint8, 16-byte
  // aligned, nbytes a multiple of 16), copied by a kernel that reaches the host memory over the bus: no
  // copy-engine transfer (in a CUDA graph a kernel node, not a memcpy node). A step's staged inputs and its
  // sampled tokens travel this way.
  m.def("copy_pinned(Tensor(a!) dst, Tensor src, int nbytes) -> ()");
  // out[r] = weight[ids[rows[r]]], a decode step's input ids gathered from the table of sampled and staged ids and
  // looked up in one launch; a zero row where rows[r] is outside ids or the id outside the vocabulary. weight:
  // [vocab, hidden] contiguous, rows of a multiple of 16 bytes; ids, rows: int64 vectors; out: contiguous
  // [len(rows), hidden] of weight's dtype.
  m.def("gather_embedding(Tensor(a!) out, Tensor weight, Tensor ids, Tensor rows) -> ()");
  // One query token per sequence against its paged KV. out, query: [num_seqs, num_q_heads, head_dim];
  // block_tables: int32 [num_seqs, max_blocks_per_seq]; context_lens: int32 [num_seqs] (0 = padding row, its
  // output is left untouched); max_context_len: a host-side bound on context_lens (fixed for a CUDA graph);
  // workspace: float32, at least nanovllm_cpp.paged_attention_workspace_size(...) elements, zeroed once
  // (nanovllm_cpp.paged_attention_workspace); the op leaves its counters at zero.
  m.def(
      "paged_attention_decode(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, int max_context_len, Tensor(b!) workspace) -> ()");
  // Decode with the attention block's prologue fused in: qk_norm_rotary_store(positions, query, key, value,
  // q_norm_weight, k_norm_weight, cos_sin_cache, k_cache, v_cache, slot_mapping, eps) then
  // paged_attention_decode(out, query, ...), except that query and key are left as they are (the normalised,
  // rotated heads live in registers). key, value: [num_seqs, num_kv_heads, head_dim] (strides free, 16-byte aligned
  // rows); positions, slot_mapping: int64 [num_seqs], the new token's position and slot: slot_mapping[s] must be
  // the slot of token context_lens[s] - 1 in the block table. The cached tokens before it are read while the
  // kernel in front of this op still runs, so no nanovllm_cpp op launched just before may have written them.
  m.def(
      "qk_norm_rotary_paged_attention(Tensor(a!) out, Tensor query, Tensor key, Tensor value, Tensor positions, "
      "Tensor? q_norm_weight, Tensor? k_norm_weight, Tensor cos_sin_cache, Tensor(b!) k_cache, Tensor(c!) v_cache, "
      "Tensor slot_mapping, Tensor block_tables, Tensor context_lens, float scale, int max_context_len, "
      "Tensor(d!) workspace, float eps) -> ()");
  // out[r] = the token of row r of logits [rows, vocab] (last dim contiguous): argmax when temperatures[r] == 0,
  // else a sample of softmax(logits[r] / T) drawn with keys[r] (int64 < 2**32) as its random stream.
  m.def("sample_tokens(Tensor(a!) out, Tensor logits, Tensor temperatures, Tensor keys) -> ()");
  // out[M, N] = x[M, K] @ weight[N, K]^T in fp32, rounded once, for decode batches: 1 <= M <= 8
  // (nanovllm_cpp.ops.SKINNY_LINEAR_MAX_ROWS), K a multiple of 8, x, weight and out of one dtype; weight
  // contiguous, x and out with contiguous rows (row strides free, 16-byte aligned for x).
  m.def("skinny_linear(Tensor(a!) out, Tensor x, Tensor weight) -> ()");
  // The MLP down projection with its activation: out = (silu(gate) * up) @ weight^T with gate_up [M, 2K] =
  // [gate | up], the activation computed in fp32; weight [N, K]; the same limits as skinny_linear.
  m.def("silu_mul_skinny_linear(Tensor(a!) out, Tensor gate_up, Tensor weight) -> ()");
  // The projection after a residual add and RMSNorm: residual_out = x + residual, then out = rms_norm(
  // residual_out, norm_weight, eps) @ weight^T, each rounded to the dtype as fused_add_rms_norm followed by
  // skinny_linear would (out of place: residual_out must not overlap x or residual). residual, residual_out:
  // contiguous, x's shape; norm_weight [K]; the same limits as skinny_linear.
  m.def(
      "add_rms_norm_skinny_linear(Tensor(a!) out, Tensor(b!) residual_out, Tensor x, Tensor residual, "
      "Tensor norm_weight, float eps, Tensor weight) -> ()");
  // The first layer's projection: out = rms_norm(x, norm_weight, eps) @ weight^T, the norm rounded to the dtype as
  // rms_norm followed by skinny_linear would. norm_weight [K]; the same limits as skinny_linear.
  m.def("rms_norm_skinny_linear(Tensor(a!) out, Tensor x, Tensor norm_weight, float eps, Tensor weight) -> ()");
}
