"""Robustness on the CPU: the bad input test_engine_validation.py does not cover, KV-cache pressure, shared
prefixes, and an interrupted generate(). Nothing is lost, nothing crashes, every block comes back."""

import gc
import os
import random
import weakref

import numpy as np
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine import model_runner as model_runner_module
from nanovllm.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
BLOCK = 16


def token_ids(outputs) -> list[list[int]]:
    return [o.token_ids for o in outputs]


def assert_drained(llm) -> None:
    """No request left anywhere and every block back on the free list."""
    alloc = llm.scheduler.allocator
    assert llm.scheduler.is_finished()
    assert alloc.num_sequences == 0
    assert alloc.num_free_blocks == alloc.num_blocks


def assert_no_sequence_alive() -> None:
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Sequence]


def random_prompts(rng: random.Random, lengths) -> list[list[int]]:
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in lengths]


# ---------------------------------------------------------------- bad input (the rejected cases live in test_engine_validation.py)


@pytest.fixture(scope="module")
def baseline(llm, prompts):
    return token_ids(llm.generate(prompts[:3], GREEDY, use_tqdm=False))


def test_numpy_ints_are_token_ids(llm, baseline, prompts):
    as_numpy = [[np.int32(t) for t in prompts[0]], list(np.asarray(prompts[1], dtype=np.int64)), tuple(prompts[2])]
    assert token_ids(llm.generate(as_numpy, GREEDY, use_tqdm=False)) == baseline


def test_single_token_list_and_single_string(llm, baseline, prompts):
    """Like vLLM: one prompt may be passed bare, as a token list or a string."""
    assert token_ids(llm.generate(prompts[1], GREEDY, use_tqdm=False)) == baseline[1:2]
    assert len(llm.generate("hello", GREEDY, use_tqdm=False)) == 1


def test_mixed_strings_and_token_lists(llm):
    """vLLM accepts a list whose prompts are each a string or a token list; the order of outputs is kept."""
    text = "The quick brown fox"
    ids = llm.get_tokenizer().encode(text)
    outputs = llm.generate([text, ids, "   ", ids[:2]], GREEDY, use_tqdm=False)
    assert outputs[0].prompt_token_ids == outputs[1].prompt_token_ids == ids
    assert outputs[0].token_ids == outputs[1].token_ids
    assert outputs[3].prompt_token_ids == ids[:2]
    assert_drained(llm)


def test_no_prompts_gives_no_outputs(llm):
    assert llm.generate([], GREEDY, use_tqdm=False) == []
    assert_drained(llm)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(top_p=float("nan")), ValueError, "top_p must be in (0, 1]"),
    (dict(top_k=2.5), ValueError, "top_k must be -1"),
    (dict(max_tokens=True), ValueError, "max_tokens must be an integer >= 1"),
    (dict(max_tokens=-3), ValueError, "max_tokens must be an integer >= 1"),
    (dict(temperature=True), TypeError, "temperature must be a number"),
    (dict(temperature="0.5"), TypeError, "temperature must be a number"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
])
def test_more_bad_sampling_params(kwargs, error, message):
    with pytest.raises(error) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)


def test_unknown_generate_keyword(llm, baseline, prompts):
    with pytest.raises(TypeError):
        llm.generate(prompts[:3], GREEDY, use_tqmd=False)
    assert token_ids(llm.generate(prompts[:3], GREEDY, use_tqdm=False)) == baseline


def test_request_exactly_at_the_limits(llm):
    """The boundaries themselves are allowed: prompt + max_tokens == max_model_len, and a request that needs
    every KV slot (the last sampled token needs none)."""
    out = llm.generate([[5] * 90], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), use_tqdm=False)
    assert len(out[0].token_ids) == 7  # 96 KV slots = the whole 6-block cache
    assert_drained(llm)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_kvcache_blocks=0), "num_kvcache_blocks must be >= 1"),
    (dict(num_kvcache_blocks=2.5), "num_kvcache_blocks must be >= 1, got 2.5"),
    (dict(gpu_memory_utilization="0.5"), "gpu_memory_utilization must be in (0, 1], got '0.5'"),
    (dict(dtype="float33"), "dtype must be 'auto', 'float16', 'bfloat16' or 'float32', got 'float33'"),
    (dict(dtype=torch.int8), "dtype must be"),
    (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization must be in (0, 1]"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization must be in (0, 1]"),
    (dict(max_num_seqs=0), "max_num_seqs must be a positive integer"),
    (dict(kvcache_block_size=0), "kvcache_block_size must be a positive integer"),
    (dict(max_model_len=2049), "max_position_embeddings=2048"),
])
def test_bad_engine_limits(tiny_models, kwargs, message):
    with pytest.raises(ValueError) as info:
        LLM(tiny_models["qwen3"], device="cpu", **kwargs)
    assert message in str(info.value)


def test_failed_load_leaves_no_model_behind(tiny_models, tmp_path, monkeypatch):
    """A checkpoint with a wrong tensor shape fails; once the error is dropped nothing keeps the half-loaded
    model alive (on the GPU its memory is returned: test_robustness_gpu.py measures it)."""
    import shutil
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(os.path.join(tiny_models["qwen3"], "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = torch.zeros(3, 3)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    models = []
    original = model_runner_module.load_model

    def spy(model, path):
        models.append(weakref.ref(model))
        return original(model, path)
    monkeypatch.setattr(model_runner_module, "load_model", spy)

    def attempt():
        try:
            LLM(str(folder), device="cpu")
        except ValueError as error:
            return str(error)
    message = attempt()
    assert message is not None and name in message and "model.safetensors" in message
    gc.collect()
    assert len(models) == 1 and models[0]() is None


# ---------------------------------------------------------------- memory pressure and scheduling


def mixed_workload(seed: int, n: int = 64):
    rng = random.Random(seed)
    prompts = random_prompts(rng, [rng.randrange(1, 150) for _ in range(n)])
    params = [SamplingParams(temperature=0, max_tokens=rng.randrange(1, 24), ignore_eos=True) for _ in range(n)]
    return prompts, params


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_cache_just_large_enough_for_the_longest_request(tiny_models, prefix_caching):
    prompts, params = mixed_workload(seed=5)
    longest = max(len(p) + sp.max_tokens - 1 for p, sp in zip(prompts, params))  # KV slots it needs
    tight_blocks = -(-longest // BLOCK)
    with LLM(tiny_models["qwen3"], device="cpu", max_model_len=256) as roomy:
        expected = token_ids(roomy.generate(prompts, params, use_tqdm=False))
        assert roomy.num_preemptions == 0
    with LLM(tiny_models["qwen3"], device="cpu", max_model_len=256, num_kvcache_blocks=tight_blocks,
             enable_prefix_caching=prefix_caching) as tight:
        outputs = tight.generate(prompts, params, use_tqdm=False)
        print(f"\n{tight_blocks} blocks, prefix caching {prefix_caching}: {tight.num_preemptions} preemptions")
        assert token_ids(outputs) == expected
        assert [len(o.token_ids) for o in outputs] == [sp.max_tokens for sp in params]
        assert tight.num_preemptions > 0
        assert_drained(tight)
        del outputs
        assert_no_sequence_alive()
        with pytest.raises(ValueError, match="more than the whole KV cache"):
            tight.generate([[5] * (tight_blocks * BLOCK)], SamplingParams(max_tokens=2), use_tqdm=False)


SYSTEM_LEN = 4 * BLOCK


def system_prompt_workload(n: int):
    rng = random.Random(9)
    system = random_prompts(rng, [SYSTEM_LEN])[0]
    return [system + suffix for suffix in random_prompts(rng, [rng.randrange(1, 40) for _ in range(n)])]


def record_prefix_blocks(llm, monkeypatch) -> list[list[tuple[int, ...]]]:
    """After each prefill schedule: the system-prompt blocks of every sequence in the step."""
    steps = []
    schedule = llm.scheduler.schedule

    def spy():
        batch = schedule()
        if batch.is_prefill:
            alloc = llm.scheduler.allocator
            steps.append([tuple(alloc.block_table(c.seq.seq_id)[:SYSTEM_LEN // BLOCK]) for c in batch.chunks])
        return batch
    monkeypatch.setattr(llm.scheduler, "schedule", spy)
    return steps


def test_shared_system_prompt_together_and_in_waves(tiny_models, monkeypatch):
    prompts = system_prompt_workload(24)
    with LLM(tiny_models["qwen3"], device="cpu", max_model_len=256, enable_prefix_caching=False) as plain:
        expected = token_ids(plain.generate(prompts, GREEDY, use_tqdm=False))
    with LLM(tiny_models["qwen3"], device="cpu", max_model_len=256) as llm:
        steps = record_prefix_blocks(llm, monkeypatch)
        def stats():  # a snapshot, not a live view
            return llm.scheduler.allocator.stats
        assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
        together = stats().hit_tokens / stats().query_tokens
        # Submitted together: one prefill step, and all 24 share the first one's blocks.
        assert len(steps) == 1 and len(steps[0]) == 24 and len(set(steps[0])) == 1
        assert stats().hit_tokens >= 23 * SYSTEM_LEN
        outputs = []
        for wave in range(3):
            hits = stats().hit_tokens
            outputs += token_ids(llm.generate(prompts[wave * 8:(wave + 1) * 8], GREEDY, use_tqdm=False))
            assert stats().hit_tokens - hits >= 8 * SYSTEM_LEN
        assert outputs == expected
        assert len({blocks for step in steps for blocks in step}) == 1  # never a second copy of the system prompt
        total = stats()
        print(f"\nprefix cache hit rate: together {together:.2f}, overall {total.hit_tokens / total.query_tokens:.2f}"
              f" ({total.hit_tokens} of {total.query_tokens} prompt tokens), {total.evictions} evictions")
        assert together > 0.6
        assert_drained(llm)


@pytest.mark.parametrize("length", [BLOCK, 3 * BLOCK])
@pytest.mark.parametrize("max_tokens", [1, 5])
def test_fully_cached_prompt_resubmitted(tiny_models, length, max_tokens):
    prompt = random_prompts(random.Random(length), [length])
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with LLM(tiny_models["qwen3"], device="cpu", max_model_len=256) as llm:
        first = token_ids(llm.generate(prompt, params, use_tqdm=False))
        hits = llm.scheduler.allocator.stats.hit_tokens
        again = token_ids(llm.generate(prompt * 2, params, use_tqdm=False))
        # The last block may be recomputed, not skipped (a prefill computes at least one token).
        assert llm.scheduler.allocator.stats.hit_tokens - hits >= 2 * (length - BLOCK)
        assert again == first * 2
        assert_drained(llm)


def test_every_batch_size_up_to_max_num_seqs(tiny_models):
    """max_num_seqs=100 (not a captured graph size on the GPU): every batch size 1..100 gives each prompt the
    tokens it gets alone."""
    rng = random.Random(3)
    prompts = random_prompts(rng, [rng.randrange(1, 20) for _ in range(100)])
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with LLM(tiny_models["qwen3"], device="cpu", max_model_len=64, max_num_seqs=100,
             enable_prefix_caching=False) as llm:
        alone = [llm.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]
        for size in range(2, 101):
            assert token_ids(llm.generate(prompts[:size], params, use_tqdm=False)) == alone[:size], size
        assert_drained(llm)


# ---------------------------------------------------------------- Ctrl-C


def child_pids() -> set[int]:
    pids = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def shared_memory() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def interrupt_model_run(llm, monkeypatch, at_call: int) -> None:
    submit = llm.model_runner.submit
    calls = []

    def interrupted(batch):
        calls.append(batch.is_prefill)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return submit(batch)
    monkeypatch.setattr(llm.model_runner, "submit", interrupted)


def interrupt_progress_bar(monkeypatch, at_update: int) -> None:
    from nanovllm.engine import llm_engine
    updates = []

    class InterruptedBar(llm_engine.tqdm):
        def update(self, n=1):
            updates.append(n)
            if len(updates) == at_update:
                raise KeyboardInterrupt
            return super().update(n)
    monkeypatch.setattr(llm_engine, "tqdm", InterruptedBar)


INTERRUPTS = {
    "first_prefill": lambda llm, mp: interrupt_model_run(llm, mp, 1),   # blocks committed, KV never written
    "chunked_prefill": lambda llm, mp: interrupt_model_run(llm, mp, 2),
    "decode": lambda llm, mp: interrupt_model_run(llm, mp, 6),
    "progress_bar": lambda llm, mp: interrupt_progress_bar(mp, 3),     # after some requests finished
}


@pytest.mark.parametrize("where", INTERRUPTS)
def test_ctrl_c_during_generate(where, tiny_models, prompts, monkeypatch):
    kwargs = dict(device="cpu", max_model_len=256, max_num_batched_tokens=64, num_kvcache_blocks=20)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    children, shm = child_pids(), shared_memory()
    with LLM(tiny_models["qwen3"], **kwargs) as llm:
        expected = token_ids(llm.generate(prompts, params, use_tqdm=False))
    llm = LLM(tiny_models["qwen3"], **kwargs)
    with monkeypatch.context() as patch:
        INTERRUPTS[where](llm, patch)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, params, use_tqdm=where == "progress_bar")
    assert_drained(llm)
    assert_no_sequence_alive()
    # The same engine carries on: same tokens as an engine that was never interrupted.
    assert token_ids(llm.generate(prompts, params, use_tqdm=False)) == expected
    assert_drained(llm)
    llm.close()
    with LLM(tiny_models["qwen3"], **kwargs) as fresh:  # and a new one starts in the same process
        assert token_ids(fresh.generate(prompts[:2], params, use_tqdm=False)) == expected[:2]
    assert child_pids() <= children and shared_memory() <= shm
