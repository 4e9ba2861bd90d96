"""Tensor parallelism on the CPU (gloo, 2 ranks): greedy tokens equal one rank's and transformers', kv heads
replicated when fewer than ranks, workers gone after close, two engines at once, a killed worker makes
generate raise promptly, bad sizes rejected up front."""

import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from checkpoints import hf_greedy, qwen3_config, save_random_model
from conftest import MAX_NEW_TOKENS
from nanovllm import LLM, SamplingParams
from test_engine_gpu import NUM_NEW, agree_until_near_tie, gpu_models, gpu_prompts, hf_model  # noqa: F401

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
ENGINE = dict(device="cpu", max_model_len=256, max_num_seqs=16, tensor_parallel_size=2)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def tp_engines(tiny_models):
    """One two-rank engine per tiny model, shared by the tests of this module (spawning costs seconds)."""
    engines = {name: LLM(path, **ENGINE) for name, path in tiny_models.items()}
    yield engines
    for engine in engines.values():
        engine.close()


@pytest.mark.parametrize("model", ["qwen3", "llama"])
def test_greedy_matches_one_rank_and_transformers(model, tp_engines, tiny_models, prompts, hf_reference):
    llm = tp_engines[model]
    assert len(llm.worker_pids) == 1
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    with LLM(tiny_models[model], **dict(ENGINE, tensor_parallel_size=1)) as single:
        assert single.worker_pids == []
        expected = [o.token_ids for o in single.generate(prompts, GREEDY, use_tqdm=False)]
    assert [o.token_ids for o in outputs] == expected == hf_reference(model)
    # The KV cache of each rank holds half of the kv heads.
    assert llm.model_runner.num_kv_heads == 1


def test_chunked_prefill_and_preemption(tiny_models, prompts, hf_reference):
    with LLM(tiny_models["llama"], **dict(ENGINE, max_num_batched_tokens=24, num_kvcache_blocks=14)) as llm:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.token_ids for o in outputs] == hf_reference("llama")
        assert llm.num_preemptions > 0


@pytest.fixture(scope="module")
def one_kv_head_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("models") / "qwen3_one_kv_head")
    return save_random_model(qwen3_config(num_key_value_heads=1), path, seed=3)


def test_kv_head_replicated_when_fewer_than_ranks(one_kv_head_model, prompts):
    reference = AutoModelForCausalLM.from_pretrained(one_kv_head_model, dtype=torch.float32).eval()
    expected = hf_greedy(reference, prompts[:6], MAX_NEW_TOKENS)
    with LLM(one_kv_head_model, **ENGINE) as llm:
        assert llm.model_runner.num_kv_heads == 1
        assert [o.token_ids for o in llm.generate(prompts[:6], GREEDY, use_tqdm=False)] == expected


def test_two_engines_at_once_then_none_left(tiny_models, prompts, hf_reference):
    before = {p.pid for p in multiprocessing.active_children()}
    with LLM(tiny_models["qwen3"], **ENGINE) as a, LLM(tiny_models["llama"], **ENGINE) as b:
        pids = a.worker_pids + b.worker_pids
        assert len(set(pids)) == 2
        assert [o.token_ids for o in a.generate(prompts[:4], GREEDY, use_tqdm=False)] == hf_reference("qwen3")[:4]
        assert [o.token_ids for o in b.generate(prompts[:4], GREEDY, use_tqdm=False)] == hf_reference("llama")[:4]
    assert {p.pid for p in multiprocessing.active_children()} == before
    assert all(_gone(pid) for pid in pids)


def test_garbage_collected_engine_stops_its_workers(tiny_models):
    llm = LLM(tiny_models["qwen3"], **ENGINE)
    pids = llm.worker_pids
    del llm
    gc.collect()
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(pid) for pid in pids)


DRIVER_SCRIPT = """
import os, signal, sys
from nanovllm import LLM
llm = LLM(sys.argv[1], device="cpu", max_model_len=256, tensor_parallel_size=2)
print(*llm.worker_pids, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_exit_when_the_driver_is_killed(tiny_models):
    driver = subprocess.run([sys.executable, "-c", DRIVER_SCRIPT, tiny_models["qwen3"]], capture_output=True,
                            text=True, timeout=120)
    assert driver.returncode == -signal.SIGKILL, driver.stderr
    pids = [int(p) for p in driver.stdout.split()]
    assert len(pids) == 1
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(pid) for pid in pids)


def test_killed_worker_makes_generate_raise(tiny_models, prompts):
    llm = LLM(tiny_models["qwen3"], **ENGINE)
    pid = llm.worker_pids[0]
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"rank 1 \(pid {pid}\)"):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 10
    with pytest.raises(RuntimeError, match="rank 1"):  # the engine stays failed
        llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    llm.close()


def test_worker_killed_mid_generation(tiny_models, prompts):
    """The kill lands while the ranks are inside a step's collectives."""
    llm = LLM(tiny_models["llama"], **ENGINE)
    pid = llm.worker_pids[0]
    killer = threading.Timer(0.3, os.kill, (pid, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    many = [p for p in prompts for _ in range(20)]
    with pytest.raises(RuntimeError, match="rank 1"):
        llm.generate(many, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), use_tqdm=False)
    assert time.monotonic() - start < 15
    killer.join()
    llm.close()
    assert _gone(pid)


@pytest.mark.parametrize("size, message", [
    (0, "tensor_parallel_size must be a positive integer"),
    (True, "tensor_parallel_size must be a positive integer"),
    (3, "num_attention_heads=4 is not divisible by tensor_parallel_size=3"),
])
def test_bad_sizes_rejected_before_any_work(size, message, tiny_models):
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ValueError, match=message):
        LLM(tiny_models["qwen3"], **dict(ENGINE, tensor_parallel_size=size))
    assert {p.pid for p in multiprocessing.active_children()} == before


def test_more_ranks_than_gpus_rejected(tiny_models):
    gpus = torch.cuda.device_count()
    size = max(2, gpus + 1)
    with pytest.raises(ValueError, match=rf"tensor_parallel_size={size} exceeds the {gpus} visible GPUs"):
        LLM(tiny_models["qwen3"], **dict(ENGINE, device="cuda", tensor_parallel_size=size))


def test_kv_heads_neither_divisible_nor_dividing_rejected(tmp_path):
    config = qwen3_config(num_attention_heads=6, num_key_value_heads=3, head_dim=32)
    config.architectures = ["Qwen3ForCausalLM"]
    config.save_pretrained(tmp_path)  # the check comes before any weight or tokenizer is read
    with pytest.raises(ValueError, match="num_key_value_heads=3 and tensor_parallel_size=2: one must divide the other"):
        LLM(str(tmp_path), **ENGINE)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_nccl_with_cuda_graphs(gpu_models, gpu_prompts):
    """NCCL ranks on cuda:0 and cuda:1, all-reduces inside the captured decode graphs: greedy tokens agree with
    one GPU up to the first divergence, which must be a bf16 near-tie (the reduction order differs)."""
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    results = []
    for size in (1, 2):
        with LLM(gpu_models["qwen3"], max_model_len=1024, max_num_seqs=16, tensor_parallel_size=size) as llm:
            assert llm.model_runner.graphs and llm.model_runner.num_kv_heads == 8 // size
            results.append([o.token_ids for o in llm.generate(gpu_prompts, params, use_tqdm=False)])
    judge = hf_model(gpu_models["qwen3"], torch.float32)
    for prompt, two, one in zip(gpu_prompts, results[1], results[0]):
        agree_until_near_tie(judge, prompt, two, one)
