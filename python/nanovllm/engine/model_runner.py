"""Owns the model, the KV cache and the device buffers; turns a scheduled batch into sampled token ids."""

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

import nanovllm_cpp
from nanovllm_cpp import ops
from nanovllm.config import Config
from nanovllm.engine.scheduler import Batch
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_buffers import StepBuffers
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


def mix_seeds(seeds: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Host half of the sampler's random stream keys: one 32-bit value per (request seed, token index).
    uint64 arithmetic wraps modulo 2**64, which leaves the low 32 bits the key keeps exact."""
    return ((seeds & 0xFFFFFFFF) * 0x9E3779B1 + indices * 0x85EBCA6B + (seeds >> 32)) & 0xFFFFFFFF


@dataclass
class StagedSampling:
    """Whose sampling parameters the step buffers hold: the rows' request ids, their seeds (None: all greedy) and
    whether some row has top-k / top-p."""
    ids: list[int]
    seeds: np.ndarray | None
    filtered: bool


@dataclass
class LaunchedTokens:
    """Where a launched step's sampled tokens arrive on the host, and the event that says they are there."""
    host: torch.Tensor
    ready: torch.cuda.Event | None


@dataclass
class PrefillInputs:
    """A prefill step as host arrays: all a tensor-parallel worker needs to run it (with the staged bytes)."""
    input_ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    seqlens_q: list[int]
    seqlens_k: list[int]
    prefix_slots: np.ndarray | None
    sampling_chunks: list[int]
    filtered: bool      # some sampled row has top-k / top-p
    staged_bytes: int   # the step sends the staged fields below this byte
    tokens: LaunchedTokens | None = None

    @property
    def num_samples(self) -> int:
        return len(self.sampling_chunks)


@dataclass
class DecodeInputs:
    """A decode step whose inputs sit in the runner's step buffers (rows of them, the graph's padding included)."""
    num_seqs: int
    rows: int
    graph_bs: int | None
    filtered: bool
    staged_bytes: int
    tokens: LaunchedTokens | None = None

    @property
    def num_samples(self) -> int:
        return self.num_seqs


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
    def _allocate_decode_buffers(self) -> None:
        n = self.max_num_seqs
        cuda = self.device.type == "cuda"
        self.buffers = StepBuffers(n, self.max_blocks, self.device)
        self.buffers.h["slots"][:] = -1
        self.buffers.h["input_rows"][:] = self.buffers.staged_rows(n)
        self.buffers.send(self.buffers.decode_bytes(n))  # padding rows store nothing, even in the warm-ups
        # A decode row's input id is token_pool[input_rows[row]]: a token the sampler wrote to d_tokens in the
        # step before, or a staged input id (both regions of the step buffers' device side).
        self.token_pool = self.buffers.token_pool
        self.d_tokens = self.buffers.d["sampled"]
        # Two of each: while a step's tokens travel to the host, the step after it may already be launched.
        self.h_tokens = [self.buffers.new_token_buffer() for _ in range(2)]
        self.tokens_ready = [torch.cuda.Event() for _ in range(2)] if cuda else [None, None]
        self.num_launches = 0
        # Recorded after every copy of the staged bytes (in the graphs too): the host rewrites them only after it.
        self.staged_sent = torch.cuda.Event(external=True) if cuda else None
        self._staged_sampling: StagedSampling | None = None

    def _decode_context(self, rows: int) -> Context:
        d = self.buffers.d
        return Context(False, d["slots"][:rows], context_lens=d["context_lens"][:rows],
                       block_tables=d["block_tables"][:rows])

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

    @contextlib.contextmanager
    def _scratch_kv_cache(self):
        """A one-block cache for the warm-ups, which run before the real one exists: every slot they use is -1
        (nothing stored) and every decode row has context 0 (nothing read)."""
        scratch = torch.zeros(2, 1, self.block_size, self.num_kv_heads, self.head_dim, dtype=self.dtype,
                              device=self.device)
        for layer in self.attn_layers:
            layer.k_cache, layer.v_cache = scratch[0], scratch[1]
        try:
            yield
        finally:
            reset_context()
            for layer in self.attn_layers:
                layer.k_cache = layer.v_cache = torch.empty(0)

    def _warmup_prefill(self) -> None:
        """The largest prefill the scheduler can issue: max_num_batched_tokens tokens."""
        total = self.config.max_num_batched_tokens
        num_seqs = min(self.max_num_seqs, -(-total // self.config.max_model_len))
        lens = [total // num_seqs + (i < total % num_seqs) for i in range(num_seqs)]
        lens = [n for n in lens if n > 0]
        cu = torch.tensor(np.cumsum([0] + lens), dtype=torch.int32, device=self.device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        with self._scratch_kv_cache():
            set_context(Context(True, torch.full((sum(lens),), -1, dtype=torch.int64, device=self.device), cu, cu,
                                max(lens), max(lens), lens, lens))
            hidden = self.model(torch.zeros(sum(lens), dtype=torch.int64, device=self.device), positions)
            self._warmup_filtered_sampler(self.model.compute_logits(hidden[cu[1:].long() - 1]))

    def _warmup_decode(self) -> None:
        """The largest decode step, every row padding."""
        n = self.max_num_seqs
        with self._scratch_kv_cache():
            set_context(self._decode_context(n))
            self._warmup_filtered_sampler(self._decode_forward(n))

    def _warmup_filtered_sampler(self, logits: torch.Tensor) -> None:
        """The top-k / top-p path sorts the logits: the most memory any sampling takes."""
        n = logits.shape[0]
        ones = torch.ones(n, device=self.device)
        self.sampler(logits, ones, torch.full((n,), 2, device=self.device), ones * 0.9,
                     torch.zeros(n, dtype=torch.int64, device=self.device), filtered=True)

    def _allocate_kv_cache(self) -> None:
        shape = (2, len(self.attn_layers), self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        log.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB)", self.num_blocks, self.block_size,
                 self.num_blocks * self.block_size, self.kv_cache.numel() * self.kv_cache.element_size() / (1 << 30))

    # ---------------------------------------------------------------- CUDA graphs
    def _send_staged(self, nbytes: int) -> None:
        self.buffers.send(nbytes)
        if self.staged_sent is not None:
            self.staged_sent.record()

    def _decode_forward(self, rows: int) -> torch.Tensor:
        """Model, LM head and sampler over the first rows of the step buffers (the body of a decode graph): the
        tokens land in d_tokens[:rows]; returns the logits (model dtype) for the top-k / top-p path."""
        d = self.buffers.d
        hidden = self.model(self.token_pool, d["positions"][:rows], d["input_rows"][:rows])
        logits = self.model.compute_logits(hidden)
        ops.sample_tokens(self.d_tokens[:rows], logits, d["temperatures"][:rows], d["keys"][:rows])
        return logits

    @torch.inference_mode()
    def _capture_decode_graphs(self) -> None:
        self.graph_sizes = graph_batch_sizes(self.max_num_seqs)
        self.graph_logits: dict[int, torch.Tensor] = {}
        pool = None
        for bs in reversed(self.graph_sizes):  # largest first: smaller graphs reuse its pool
            set_context(self._decode_context(bs))
            self._decode_forward(bs)  # warm-up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):  # the staged inputs' copy too: one replay is the whole launch
                self._send_staged(self.buffers.decode_bytes(bs))
                self.graph_logits[bs] = self._decode_forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()
        reset_context()

    # ---------------------------------------------------------------- steps
    @torch.inference_mode()
    def run(self, batch: Batch) -> list[int]:
        """Runs the step; returns one sampled token per sequence of batch.sampling_seqs."""
        return self.collect(self.submit(batch))

    def submit(self, batch: Batch) -> PrefillInputs | DecodeInputs:
        """Prepares and launches the step; collect(inputs) waits for its tokens."""
        inputs = self.prepare(batch)
        self.launch(inputs)
        return inputs

    @torch.inference_mode()
    def logits(self, batch: Batch) -> torch.Tensor:
        """float32 [len(batch.sampling_seqs), vocab]: next-token logits (the step runs whole: KV stored, tokens
        sampled)."""
        inputs = self.prepare(batch)
        logits = self.launch(inputs)
        self.collect(inputs)  # the next step may rewrite the staged inputs only once this one has read them
        return logits.float()

    def prepare(self, batch: Batch) -> PrefillInputs | DecodeInputs:
        """The host part of a step: its inputs, in host arrays and the staged step buffers (once the launched
        step before it has read them)."""
        if self.staged_sent is not None:
            self.staged_sent.synchronize()
        return self._prefill_inputs(batch) if batch.is_prefill else self._decode_inputs(batch)

    @torch.inference_mode()
    def launch(self, inputs: PrefillInputs | DecodeInputs) -> torch.Tensor:
        """Queues the step's device work (every rank's) and the copy of its tokens to the host; returns the
        sampled rows' logits."""
        logits = self.execute(inputs) if self.tp is None else self.tp.run_step(inputs, self)
        n = inputs.num_samples
        if n:
            parity = self.num_launches % 2
            self.num_launches += 1
            inputs.tokens = LaunchedTokens(self.h_tokens[parity], self.tokens_ready[parity])
            self.buffers.fetch_sampled(inputs.tokens.host, n)
            if inputs.tokens.ready is not None:
                inputs.tokens.ready.record()
        return logits

    def collect(self, inputs: PrefillInputs | DecodeInputs) -> list[int]:
        """Waits for the launched step's tokens."""
        if not inputs.num_samples:
            return []
        if inputs.tokens.ready is not None:
            inputs.tokens.ready.synchronize()
        return inputs.tokens.host.view(torch.int64).numpy()[:inputs.num_samples].tolist()

    def execute(self, inputs: PrefillInputs | DecodeInputs) -> torch.Tensor:
        """The device part of a step, run by every tensor-parallel rank in the same order: model, LM head and
        sampler. The tokens land in d_tokens[:inputs.num_samples]; returns those rows' logits (model dtype)."""
        d, n = self.buffers.d, inputs.num_samples
        if isinstance(inputs, PrefillInputs):
            self._send_staged(inputs.staged_bytes)
            logits = self.model.compute_logits(self._run_prefill(inputs))
            reset_context()
            if n and not inputs.filtered:
                ops.sample_tokens(self.d_tokens[:n], logits, d["temperatures"][:n], d["keys"][:n])
        elif inputs.graph_bs:
            self.graphs[inputs.graph_bs].replay()  # it sends the staged inputs itself
            logits = self.graph_logits[inputs.graph_bs][:n]
        else:
            self._send_staged(inputs.staged_bytes)
            set_context(self._decode_context(inputs.rows))
            logits = self._decode_forward(inputs.rows)
            reset_context()
        if inputs.filtered:  # the rare path: on top of the graph's plain sample, which it overrides
            self.sampler(logits, d["temperatures"][:n], d["top_ks"][:n], d["top_ps"][:n], d["keys"][:n],
                         filtered=True, out=self.d_tokens[:n])
        return logits

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=True)

    def _stage_sampling(self, seqs: list[Sequence], ids: list[int], token_indices: np.ndarray) -> bool:
        """Writes the rows' sampling parameters into the step buffers; returns whether some row uses top-k/top-p.
        token_indices: each row's index of the token being sampled (a pending token counted), its random key's
        second half. The per-request fields stay in the buffers from the step before when its rows were the same
        requests (ids), as they are in most decode steps: only the keys change."""
        n, h = len(seqs), self.buffers.h
        if self._staged_sampling is None or self._staged_sampling.ids != ids:
            params = [s.params for s in seqs]
            h["temperatures"][:n] = [p.temperature for p in params]
            seeds = np.fromiter((s.seed for s in seqs), np.uint64, n) if h["temperatures"][:n].any() else None
            filtered = any(p.top_k != -1 or p.top_p < 1 for p in params)
            if filtered:
                h["top_ks"][:n] = [p.top_k if p.top_k != -1 else self.vocab_size for p in params]
                h["top_ps"][:n] = [p.top_p for p in params]
            self._staged_sampling = StagedSampling(ids, seeds, filtered)
        seeds = self._staged_sampling.seeds
        if seeds is not None:
            h["keys"][:n] = mix_seeds(seeds, token_indices.astype(np.uint64))
        return self._staged_sampling.filtered

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
        seqs = batch.sampling_seqs
        filtered = self._stage_sampling(seqs, [s.seq_id for s in seqs],
                                        np.fromiter((len(s.token_ids) + s.num_pending_tokens for s in seqs), np.int64,
                                                    len(seqs)))
        return PrefillInputs(input_ids, positions, slots, seqlens_q, seqlens_k, prefix_slots,
                             [i for i, c in enumerate(chunks) if c.samples], filtered, self.buffers.sampling_bytes)

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
        last = torch.from_numpy(np.cumsum(seqlens_q)[inputs.sampling_chunks] - 1)
        return hidden[self._to_device(last)]

    def _decode_inputs(self, batch: Batch) -> DecodeInputs:
        seqs, ids = batch.seqs, batch.seq_ids
        n = len(seqs)
        graph_bs = next((bs for bs in self.graph_sizes if bs >= n), None) if self.graphs else None
        rows = graph_bs or n
        h = self.buffers.h
        h["input_rows"][:rows] = self.buffers.staged_rows(rows)
        if batch.input_rows is None:
            h["input_ids"][:n] = batch.input_ids
        else:  # planned ahead: the inputs are the running step's tokens, still on the device
            h["input_rows"][:n] = batch.input_rows
        self.allocator.fill_decode_inputs(ids, h["positions"], h["slots"], h["context_lens"])
        self.allocator.fill_block_tables(ids, h["block_tables"][:n], 0)
        if rows > n:  # padding rows of a captured graph: nothing stored, no attention
            for name, value in (("slots", -1), ("context_lens", 0), ("input_ids", 0), ("positions", 0)):
                h[name][n:rows] = value
        # The token sampled from row i has index context_lens[i] (the allocator counts a pending token).
        filtered = self._stage_sampling(seqs, ids, h["context_lens"][:n])
        return DecodeInputs(n, rows, graph_bs, filtered, self.buffers.decode_bytes(rows))

    def close(self) -> None:
        self.graphs.clear()
        self.graph_logits = {}
        for layer in self.attn_layers:
            layer.k_cache = layer.v_cache = layer.workspace = torch.empty(0)
        del self.kv_cache, self.model, self.workspace
        if self.device.type == "cuda":
            torch.cuda.synchronize()
