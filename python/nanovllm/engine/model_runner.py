"""Owns the model, the KV cache and the device buffers; turns a scheduled batch into sampled token ids."""

import logging
from dataclasses import dataclass

import numpy as np
import torch

import nanovllm_cpp
from nanovllm.config import Config
from nanovllm.engine.scheduler import Batch
from nanovllm.layers.attention import Attention
from nanovllm.layers.parallel import building_with
from nanovllm.layers.sampler import Sampler
from nanovllm.models import MODELS
from nanovllm.models.llama import head_dim_of
from nanovllm.utils.context import Context, reset_context, set_context
from nanovllm.utils.loader import load_model

log = logging.getLogger("nanovllm")

CPU_KV_CACHE_BYTES = 1 << 30  # without a GPU there is no free memory to measure: a fixed budget


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16)) + [max_num_seqs]
    return sorted(set(sizes))


def _mix_seed(seed: int, index: int) -> int:
    """Host half of the sampler's random stream key: one value per (request seed, token index)."""
    return ((seed & 0xFFFFFFFF) * 0x9E3779B1 + index * 0x85EBCA6B + (seed >> 32)) & 0xFFFFFFFF


@dataclass
class PrefillInputs:
    """A prefill step as host arrays: all a tensor-parallel worker needs to run it."""
    input_ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    seqlens_q: list[int]
    seqlens_k: list[int]
    prefix_slots: np.ndarray | None
    sampling_chunks: list[int]


@dataclass
class DecodeInputs:
    """A decode step whose inputs sit in the runner's host buffers (rows of them, the graph's padding included)."""
    num_seqs: int
    rows: int
    graph_bs: int | None
    block_table_width: int


class ModelRunner:
    def __init__(self, config: Config, tp=None):
        """tp: the engine's TensorParallelDriver, or a worker's TensorParallelRank (None for one rank): the model
        is built with its process group, step inputs reach the workers through it, all ranks agree on the KV size."""
        self.config = config
        self.tp = tp
        hf = config.hf_config
        self.device = torch.device(config.device)
        self.dtype = config.dtype
        self.block_size = config.kvcache_block_size
        self.max_num_seqs = config.max_num_seqs
        self.max_blocks = config.max_blocks_per_seq
        self.vocab_size = hf.vocab_size
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device), building_with(tp.group if tp else None):
                self.model = MODELS[hf.architectures[0]](hf)
        finally:
            torch.set_default_dtype(default_dtype)
        self.model.requires_grad_(False)
        load_model(self.model, config.model)
        self.sampler = Sampler()
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.num_kv_heads = self.attn_layers[0].num_kv_heads
        self.head_dim = head_dim_of(hf)
        self.workspace = nanovllm_cpp.paged_attention_workspace(
            self.max_num_seqs, self.attn_layers[0].num_heads, self.head_dim, config.max_model_len, self.device)
        for layer in self.attn_layers:
            layer.workspace = self.workspace
            layer.max_context_len = config.max_model_len  # fixed, so CUDA graphs stay valid for any length
        self._allocate_decode_buffers()
        self.num_blocks = self._count_kv_blocks()
        if tp is not None:  # every rank holds the same blocks: the fewest that fit on any GPU
            self.num_blocks = tp.min_over_ranks(self.num_blocks)
        self._allocate_kv_cache()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_decode_graphs()

    # ---------------------------------------------------------------- buffers and KV cache
    def _host(self, *shape, dtype) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, pin_memory=self.device.type == "cuda")

    def _allocate_decode_buffers(self) -> None:
        n = self.max_num_seqs
        # Host side: numpy views of pinned tensors that the allocator's fill_* methods write into.
        self.h_input_ids = self._host(n, dtype=torch.int64)
        self.h_positions = self._host(n, dtype=torch.int64)
        self.h_slots = self._host(n, dtype=torch.int64)
        self.h_context_lens = self._host(n, dtype=torch.int32)
        self.h_block_tables = self._host(n, self.max_blocks, dtype=torch.int32)
        self.h_temperatures = self._host(n, dtype=torch.float32)
        self.h_keys = self._host(n, dtype=torch.int64)
        self.h_top_ks = self._host(n, dtype=torch.int64)
        self.h_top_ps = self._host(n, dtype=torch.float32)
        # Device side: fixed addresses, so the captured CUDA graphs read them.
        self.d_input_ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.d_positions = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.d_slots = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        self.d_context_lens = torch.zeros(n, dtype=torch.int32, device=self.device)
        self.d_block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=self.device)

    @property
    def block_bytes(self) -> int:
        element = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * len(self.attn_layers) * self.block_size * self.num_kv_heads * self.head_dim * element

    def _count_kv_blocks(self) -> int:
        if self.config.num_kvcache_blocks is not None:
            return self.config.num_kvcache_blocks
        if self.device.type != "cuda":
            wanted = self.max_num_seqs * self.max_blocks
            return max(1, min(wanted, CPU_KV_CACHE_BYTES // self.block_bytes))
        return self._measure_kv_blocks()

    @torch.inference_mode()
    def _measure_kv_blocks(self) -> int:
        """Blocks that fit in gpu_memory_utilization of the GPU once weights, the peak activations of the
        largest prefill, and the memory the decode graphs will hold are set aside."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self._warmup_prefill()
        prefill_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        self._warmup_decode()
        decode_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        used = total - free  # weights, buffers, CUDA context and anything else on the GPU
        # Decode graphs get their own memory pool: set aside one decode step's activations for it.
        reserve = prefill_peak + (0 if self.config.enforce_eager else decode_peak)
        available = int(total * self.config.gpu_memory_utilization) - used - reserve
        blocks = available // self.block_bytes
        if blocks < 1:
            gib = 1 << 30
            raise RuntimeError(
                f"no room for the KV cache: gpu_memory_utilization={self.config.gpu_memory_utilization} of "
                f"{total / gib:.2f} GiB leaves {max(available, 0) / gib:.3f} GiB after {used / gib:.2f} GiB in use "
                f"and {reserve / gib:.2f} GiB of activations; one block needs {self.block_bytes / gib:.4f} GiB. "
                "Raise gpu_memory_utilization or lower max_num_batched_tokens / max_num_seqs.")
        return blocks

    def _warmup_prefill(self) -> None:
        """The largest prefill the scheduler can issue: max_num_batched_tokens tokens, no KV stored."""
        total = self.config.max_num_batched_tokens
        num_seqs = min(self.max_num_seqs, -(-total // self.config.max_model_len))
        lens = [total // num_seqs + (i < total % num_seqs) for i in range(num_seqs)]
        lens = [n for n in lens if n > 0]
        cu = torch.tensor(np.cumsum([0] + lens), dtype=torch.int32, device=self.device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        set_context(Context(True, torch.full((sum(lens),), -1, dtype=torch.int64, device=self.device), cu, cu,
                            max(lens), max(lens), lens, lens))
        hidden = self.model(torch.zeros(sum(lens), dtype=torch.int64, device=self.device), positions)
        self._warmup_sampler(hidden[cu[1:].long() - 1])
        reset_context()

    def _warmup_decode(self) -> None:
        """The largest decode step; every row is padding (context 0) so a one-block scratch cache will do."""
        n = self.max_num_seqs
        scratch = torch.zeros(2, 1, self.block_size, self.num_kv_heads, self.head_dim, dtype=self.dtype,
                              device=self.device)
        for layer in self.attn_layers:
            layer.k_cache, layer.v_cache = scratch[0], scratch[1]
        set_context(Context(False, self.d_slots[:n], context_lens=self.d_context_lens[:n],
                            block_tables=self.d_block_tables[:n]))
        hidden = self.model(self.d_input_ids[:n], self.d_positions[:n])
        self._warmup_sampler(hidden)
        reset_context()
        for layer in self.attn_layers:
            layer.k_cache = layer.v_cache = torch.empty(0)

    def _warmup_sampler(self, hidden: torch.Tensor) -> None:
        n = hidden.shape[0]
        ones = torch.ones(n, device=self.device)
        self.sampler(self.model.compute_logits(hidden), ones, torch.full((n,), 2, device=self.device), ones * 0.9,
                     torch.zeros(n, dtype=torch.int64, device=self.device), all_greedy=False, filtered=True)

    def _allocate_kv_cache(self) -> None:
        shape = (2, len(self.attn_layers), self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        log.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB)", self.num_blocks, self.block_size,
                 self.num_blocks * self.block_size, self.kv_cache.numel() * self.kv_cache.element_size() / (1 << 30))

    # ---------------------------------------------------------------- CUDA graphs
    @torch.inference_mode()
    def _capture_decode_graphs(self) -> None:
        self.graph_sizes = graph_batch_sizes(self.max_num_seqs)
        self.graph_hidden = torch.zeros(self.max_num_seqs, self.config.hf_config.hidden_size, dtype=self.dtype,
                                        device=self.device)
        pool = None
        for bs in reversed(self.graph_sizes):  # largest first: smaller graphs reuse its pool
            set_context(Context(False, self.d_slots[:bs], context_lens=self.d_context_lens[:bs],
                                block_tables=self.d_block_tables[:bs]))
            self.graph_hidden[:bs] = self.model(self.d_input_ids[:bs], self.d_positions[:bs])  # warm-up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.graph_hidden[:bs] = self.model(self.d_input_ids[:bs], self.d_positions[:bs])
            pool = graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()
        reset_context()

    # ---------------------------------------------------------------- steps
    @torch.inference_mode()
    def run(self, batch: Batch) -> list[int]:
        """Runs the step; returns one sampled token per sequence of batch.sampling_seqs."""
        logits = self.logits(batch)
        return self._sample(logits, batch.sampling_seqs).tolist() if batch.sampling_seqs else []

    @torch.inference_mode()
    def logits(self, batch: Batch) -> torch.Tensor:
        """float32 [len(batch.sampling_seqs), vocab]: next-token logits (the KV of the step is stored)."""
        inputs = self._prefill_inputs(batch) if batch.is_prefill else self._decode_inputs(batch)
        if self.tp is None:
            return self.execute(inputs)
        return self.tp.run_step(inputs, self)

    def execute(self, inputs: PrefillInputs | DecodeInputs) -> torch.Tensor:
        """The device part of a step, run by every tensor-parallel rank in the same order."""
        hidden = self._run_prefill(inputs) if isinstance(inputs, PrefillInputs) else self._run_decode(inputs)
        reset_context()
        return self.model.compute_logits(hidden)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=True)

    def _prefill_inputs(self, batch: Batch) -> PrefillInputs:
        chunks = batch.chunks
        seqlens_q = [c.end - c.start for c in chunks]
        has_prefix = any(c.start > 0 for c in chunks)
        seqlens_k = [c.end for c in chunks] if has_prefix else seqlens_q
        num_tokens = sum(seqlens_q)
        input_ids = np.concatenate([np.asarray(c.seq.token_ids[c.start:c.end], dtype=np.int64) for c in chunks])
        positions = np.concatenate([np.arange(c.start, c.end, dtype=np.int64) for c in chunks])
        slots = np.empty(num_tokens, dtype=np.int64)
        alloc = self.allocator
        offset = 0
        for chunk, n in zip(chunks, seqlens_q):
            alloc.fill_slots(chunk.seq.seq_id, chunk.start, chunk.end, slots, offset)
            offset += n
        prefix_slots = None
        if has_prefix:
            prefix_slots = np.empty(sum(seqlens_k), dtype=np.int64)
            offset = 0
            for chunk in chunks:
                alloc.fill_slots(chunk.seq.seq_id, 0, chunk.end, prefix_slots, offset)
                offset += chunk.end
        return PrefillInputs(input_ids, positions, slots, seqlens_q, seqlens_k, prefix_slots,
                             [i for i, c in enumerate(chunks) if c.samples])

    def _run_prefill(self, inputs: PrefillInputs) -> torch.Tensor:
        seqlens_q, seqlens_k = inputs.seqlens_q, inputs.seqlens_k
        prefix_slots = None if inputs.prefix_slots is None else self._to_device(torch.from_numpy(inputs.prefix_slots))
        cu_q = torch.from_numpy(np.cumsum([0] + seqlens_q, dtype=np.int32))
        cu_k = cu_q if prefix_slots is None else torch.from_numpy(np.cumsum([0] + seqlens_k, dtype=np.int32))
        set_context(Context(True, self._to_device(torch.from_numpy(inputs.slots)), self._to_device(cu_q),
                            self._to_device(cu_k), max(seqlens_q), max(seqlens_k), seqlens_q, seqlens_k,
                            prefix_slots))
        hidden = self.model(self._to_device(torch.from_numpy(inputs.input_ids)),
                            self._to_device(torch.from_numpy(inputs.positions)))
        return hidden[(cu_q[1:].to(self.device, torch.int64) - 1)[inputs.sampling_chunks]]

    def _decode_inputs(self, batch: Batch) -> DecodeInputs:
        seqs = batch.seqs
        n = len(seqs)
        ids = [s.seq_id for s in seqs]
        graph_bs = next((bs for bs in self.graph_sizes if bs >= n), None) if self.graphs else None
        rows = graph_bs or n
        self.h_input_ids.numpy()[:n] = [s.last_token for s in seqs]
        self.allocator.fill_decode_inputs(ids, self.h_positions.numpy(), self.h_slots.numpy(),
                                          self.h_context_lens.numpy())
        self.allocator.fill_block_tables(ids, self.h_block_tables.numpy()[:n], 0)
        if rows > n:  # padding rows of a captured graph: nothing stored, no attention
            self.h_slots[n:rows] = -1
            self.h_context_lens[n:rows] = 0
            self.h_input_ids[n:rows] = 0
            self.h_positions[n:rows] = 0
        # Only the columns in use: the kernel never reads a table past its context length.
        width = -(-int(self.h_context_lens.numpy()[:n].max()) // self.block_size)
        return DecodeInputs(n, rows, graph_bs, width)

    def _run_decode(self, inputs: DecodeInputs) -> torch.Tensor:
        n, rows, width = inputs.num_seqs, inputs.rows, inputs.block_table_width
        for host, dev in ((self.h_input_ids, self.d_input_ids), (self.h_positions, self.d_positions),
                          (self.h_slots, self.d_slots), (self.h_context_lens, self.d_context_lens)):
            dev[:rows].copy_(host[:rows], non_blocking=True)
        self.d_block_tables[:n, :width].copy_(self.h_block_tables[:n, :width], non_blocking=True)
        if inputs.graph_bs:
            self.graphs[inputs.graph_bs].replay()
            return self.graph_hidden[:n]
        set_context(Context(False, self.d_slots[:n], context_lens=self.d_context_lens[:n],
                            block_tables=self.d_block_tables[:n]))
        return self.model(self.d_input_ids[:n], self.d_positions[:n])

    def _sample(self, logits: torch.Tensor, seqs) -> torch.Tensor:
        params = [s.params for s in seqs]
        all_greedy = all(p.temperature == 0 for p in params)
        if all_greedy:
            return self.sampler(logits, None, None, None, None, all_greedy=True, filtered=False)
        n = len(seqs)
        filtered = any(p.top_k != -1 or p.top_p < 1 for p in params)
        # Pinned buffers filled through numpy: no tensor construction per step. Reusing them is safe because
        # run() waits for the step's tokens before the next step refills them.
        self.h_temperatures.numpy()[:n] = [p.temperature for p in params]
        self.h_keys.numpy()[:n] = [_mix_seed(s.seed, len(s)) for s in seqs]
        top_ks = top_ps = None
        if filtered:
            self.h_top_ks.numpy()[:n] = [p.top_k if p.top_k != -1 else self.vocab_size for p in params]
            self.h_top_ps.numpy()[:n] = [p.top_p for p in params]
            top_ks, top_ps = self._to_device(self.h_top_ks[:n]), self._to_device(self.h_top_ps[:n])
        return self.sampler(logits, self._to_device(self.h_temperatures[:n]), top_ks, top_ps,
                            self._to_device(self.h_keys[:n]), all_greedy=False, filtered=filtered)

    def close(self) -> None:
        self.graphs.clear()
        for layer in self.attn_layers:
            layer.k_cache = layer.v_cache = layer.workspace = torch.empty(0)
        del self.kv_cache, self.model, self.workspace
        if self.device.type == "cuda":
            torch.cuda.synchronize()
