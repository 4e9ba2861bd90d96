"""The offline engine: validates requests, runs scheduler steps, returns outputs in input order."""

import os
import random
import time
from dataclasses import dataclass, fields
from numbers import Integral

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.tensor_parallel import TensorParallelDriver
from nanovllm.sampling_params import SamplingParams


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]        # generated tokens, the final EOS / stop token included
    text: str                   # generated text, special tokens skipped
    finish_reason: str          # "eos", "stop" or "length"


class LLMEngine:
    def __init__(self, model: str, **kwargs):
        known = {f.name for f in fields(Config) if f.init}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"LLM got unknown keyword arguments {unknown} (known: {sorted(known - {'model'})})")
        self.config = Config(model, **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.eos_token_ids = self._eos_token_ids(model)
        # Token ids index the embedding, which may be larger than the tokenizer (Qwen3 pads its vocabulary).
        self.vocab_size = self.config.hf_config.vocab_size
        self.tensor_parallel = None
        if self.config.tensor_parallel_size > 1:
            self.tensor_parallel = TensorParallelDriver(self.config)
            with self.tensor_parallel.watch():
                self.model_runner = ModelRunner(self.config, self.tensor_parallel)
        else:
            self.model_runner = ModelRunner(self.config)
        self.scheduler = Scheduler(self.config, self.model_runner.num_blocks, self.eos_token_ids)
        self.model_runner.allocator = self.scheduler.allocator
        self._rng = random.Random()
        self._in_flight = None  # (batch, inputs) of a step launched but not yet collected

    def _eos_token_ids(self, model: str) -> set[int]:
        """Every id the generation config lists as EOS (it may be a list), else the model config's."""
        eos = None
        if os.path.isfile(os.path.join(model, "generation_config.json")):
            eos = GenerationConfig.from_pretrained(model).eos_token_id
        if eos is None:
            eos = getattr(self.config.hf_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the tensor-parallel workers (ranks 1..N-1); empty for one rank."""
        return self.tensor_parallel.worker_pids if self.tensor_parallel else []

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def get_tokenizer(self):
        return self.tokenizer

    # ---------------------------------------------------------------- validation
    def _prepare(self, prompts, sampling_params) -> list[Sequence]:
        """Every request checked before any is queued: a bad one leaves the engine untouched."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], Integral)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts "
                             "(pass one, or one per prompt)")
        limit = self.config.max_model_len
        capacity = self.model_runner.num_blocks * self.config.kvcache_block_size
        requests = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            where = f"request {i}"
            if not isinstance(params, SamplingParams):
                raise TypeError(f"{where}: sampling params must be SamplingParams, got {type(params).__name__}")
            params.validate(where)
            token_ids = self._token_ids(prompt, where)
            total = len(token_ids) + params.max_tokens
            if total > limit:
                raise ValueError(f"{where}: prompt of {len(token_ids)} tokens + max_tokens={params.max_tokens} = "
                                 f"{total} exceeds max_model_len={limit}")
            # The last sampled token never needs KV, so a request needs room for total - 1 tokens.
            if total - 1 > capacity:
                raise ValueError(f"{where}: prompt of {len(token_ids)} tokens + max_tokens={params.max_tokens} needs "
                                 f"{total - 1} KV slots, more than the whole KV cache holds ({capacity} tokens)")
            requests.append((token_ids, params))
        return [Sequence(ids, p, p.seed if p.seed is not None else self._rng.getrandbits(63)) for ids, p in requests]

    def _token_ids(self, prompt, where: str) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"{where}: empty prompt")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            if not all(isinstance(t, Integral) and not isinstance(t, bool) for t in prompt):
                raise TypeError(f"{where}: token ids must be integers")
            token_ids = [int(t) for t in prompt]
            bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        else:
            raise TypeError(f"{where}: a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError(f"{where}: empty prompt")
        return token_ids

    # ---------------------------------------------------------------- generation
    def has_work(self) -> bool:
        return self._in_flight is not None or not self.scheduler.is_finished()

    def step(self) -> tuple[list[Sequence], int]:
        """Completes one scheduler step; returns the sequences that finished and the tokens processed (positive for
        a prefill, negative for a decode). Where the next step is a decode that needs none of this step's results
        but its tokens, it is launched before this one's tokens are read, so the host plans it while the device
        runs this one, and the device never waits for the host between them."""
        runner, scheduler = self.model_runner, self.scheduler
        if self._in_flight is None:
            batch = scheduler.schedule()
            inputs = runner.submit(batch)
        else:
            batch, inputs = self._in_flight
        self._in_flight = None
        ahead = scheduler.schedule_ahead(batch)
        if ahead is not None:
            self._in_flight = (ahead, runner.submit(ahead))
        finished = scheduler.postprocess(batch, runner.collect(inputs))
        if batch.is_prefill:
            return finished, sum(c.end - c.start for c in batch.chunks)
        return finished, -len(batch.seqs)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        seqs = self._prepare(prompts, sampling_params)
        order = {seq.seq_id: i for i, seq in enumerate(seqs)}
        for seq in seqs:
            self.scheduler.add(seq)
        outputs: list[RequestOutput | None] = [None] * len(seqs)
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        try:
            while self.has_work():
                start = time.perf_counter()
                finished, num_tokens = self.step()
                elapsed = time.perf_counter() - start
                if num_tokens > 0:
                    prefill_tps = num_tokens / elapsed
                else:
                    decode_tps = -num_tokens / elapsed
                bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s", refresh=False)
                for seq in finished:
                    outputs[order[seq.seq_id]] = self._output(seq)
                    bar.update(1)
        except BaseException:
            self.abort()
            raise
        finally:
            bar.close()
        return outputs

    def abort(self) -> None:
        """Drops every request, the step in flight included; the engine stays usable."""
        self._in_flight = None
        self.scheduler.abort_all()

    def _output(self, seq: Sequence) -> RequestOutput:
        ids = seq.completion_token_ids
        return RequestOutput(seq.token_ids[:seq.num_prompt_tokens], ids,
                             self.tokenizer.decode(ids, skip_special_tokens=True), seq.finish_reason)

    def close(self) -> None:
        """Frees the model, the KV cache and the CUDA graphs; the engine is unusable afterwards."""
        if getattr(self, "model_runner", None) is None:
            return
        self.abort()
        self.model_runner.close()
        self.model_runner = None
        if self.tensor_parallel is not None:
            self.tensor_parallel.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
