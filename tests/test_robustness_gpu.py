"""Robustness on the GPU: failed start-ups give their memory back, a tight KV cache and every batch size up to
a max_num_seqs that is no captured graph size give the tokens of an unconstrained eager run, Ctrl-C mid-decode
leaves the engine usable. (The long soak is benchmarks/soak.py.)

bf16 outputs of different batch shapes may differ at near-ties (cuBLAS picks kernels by shape), so tokens are
compared as test_engine_gpu.py does: equal up to the first divergence, which the fp32 model must find near-tied;
the graph-vs-eager sweep compares decode logits directly.
"""

import gc
import os
import random
import shutil

import pytest
import torch

from checkpoints import qwen3_config, save_random_model
from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A small bf16 Qwen3 (2 layers, head_dim 128): fast to load, the real kernels all run."""
    config = qwen3_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                          intermediate_size=512, max_position_embeddings=4096)
    return save_random_model(config, str(tmp_path_factory.mktemp("robust_gpu") / "qwen3"), dtype=torch.bfloat16,
                             seed=7)


@pytest.fixture(scope="module")
def judge(model):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).cuda().eval()


@pytest.fixture(scope="module")
def warm_process(model):
    """One full start and generate first: cuBLAS keeps a workspace per stream from its first GEMM on, which
    is the process's, not a leak of the engine under test."""
    with LLM(model, max_model_len=256, num_kvcache_blocks=64) as llm:
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)


def allocated() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


# What a failed start may leave behind; the smallest thing it could leak, the 2-layer model's embedding,
# is 25 MB.
LEFT_BEHIND_LIMIT = 1 << 20


def assert_drained(llm) -> None:
    alloc = llm.scheduler.allocator
    assert llm.scheduler.is_finished() and alloc.num_sequences == 0 and alloc.num_free_blocks == alloc.num_blocks


def assert_same_until_near_tie(judge, prompts, ours, reference) -> int:
    from test_engine_gpu import agree_until_near_tie
    return sum(agree_until_near_tie(judge, p, a, b)[0] for p, a, b in zip(prompts, ours, reference))


def start_and_fail(*args, **kwargs) -> str:
    """Like a user's try/except: the error (and its traceback's frames) are gone when this returns."""
    try:
        LLM(*args, **kwargs)
    except (ValueError, RuntimeError) as error:
        return str(error)
    raise AssertionError("LLM started")


def test_wrong_weight_shape_gives_gpu_memory_back(model, tmp_path, warm_process):
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "bad"
    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(os.path.join(model, "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.weight"
    weights[name] = weights[name][:, :-1].contiguous()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    before = allocated()
    message = start_and_fail(str(folder))
    assert name in message and "model.safetensors" in message
    assert abs(allocated() - before) < LEFT_BEHIND_LIMIT


def test_too_little_memory_says_found_and_needed_and_gives_memory_back(model, warm_process):
    before = allocated()
    message = start_and_fail(model, max_model_len=1024, gpu_memory_utilization=0.001)
    assert "gpu_memory_utilization=0.001" in message and "GiB" in message and "one block needs" in message
    assert abs(allocated() - before) < LEFT_BEHIND_LIMIT
    with LLM(model, max_model_len=1024, gpu_memory_utilization=0.3) as llm:  # and a working start follows
        assert len(llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].token_ids) == 16
    assert abs(allocated() - before) < LEFT_BEHIND_LIMIT


def test_cache_just_large_enough_for_the_longest_request(model, judge):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randrange(1, 300))] for _ in range(64)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randrange(1, 32), ignore_eos=True) for _ in prompts]
    longest = max(len(p) + sp.max_tokens - 1 for p, sp in zip(prompts, params))
    with LLM(model, max_model_len=512, num_kvcache_blocks=4096, enforce_eager=True) as roomy:
        expected = [o.token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    with LLM(model, max_model_len=512, num_kvcache_blocks=-(-longest // 16), max_num_seqs=64) as tight:
        outputs = [o.token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
        assert tight.num_preemptions > 0
        assert_drained(tight)
    assert [len(o) for o in outputs] == [sp.max_tokens for sp in params]
    agreed = assert_same_until_near_tie(judge, prompts, outputs, expected)
    print(f"\ntight cache: {tight.num_preemptions} preemptions, {agreed} of {sum(map(len, expected))} tokens "
          "equal before a near-tie")


def test_shared_prefix_in_one_step_and_in_waves(model, judge):
    rng = random.Random(9)
    system = [rng.randrange(3, 49152) for _ in range(200)]
    prompts = [system + [rng.randrange(3, 49152) for _ in range(rng.randrange(1, 60))] for _ in range(48)]
    with LLM(model, max_model_len=512, enable_prefix_caching=False, num_kvcache_blocks=4096) as plain:
        expected = [o.token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    with LLM(model, max_model_len=512, num_kvcache_blocks=4096) as llm:
        together = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        hits = llm.scheduler.allocator.stats.hit_tokens
        assert hits >= 47 * (200 // 16 * 16)
        waves = [o.token_ids for i in range(0, 48, 16)
                 for o in llm.generate(prompts[i:i + 16], GREEDY, use_tqdm=False)]
        stats = llm.scheduler.allocator.stats
        assert stats.hit_tokens - hits >= 48 * (200 // 16 * 16)
        print(f"\nprefix cache hit rate {stats.hit_tokens / stats.query_tokens:.2f}")
        assert_drained(llm)
    assert_same_until_near_tie(judge, prompts, together, expected)
    assert_same_until_near_tie(judge, prompts, waves, expected)


def decode_logits(llm, prompts) -> torch.Tensor:
    """One prefill of all prompts, then the logits of one decode step of them all."""
    scheduler = llm.scheduler
    for prompt in prompts:
        scheduler.add(Sequence(prompt, GREEDY, seed=0))
    batch = scheduler.schedule()
    assert batch.is_prefill and len(batch.sampling_seqs) == len(prompts)
    scheduler.postprocess(batch, llm.model_runner.run(batch))
    batch = scheduler.schedule()
    assert not batch.is_prefill and len(batch.seqs) == len(prompts)
    logits = llm.model_runner.logits(batch).float()
    for seq in batch.seqs:
        scheduler.allocator.free(seq.seq_id)
    scheduler.running.clear()
    return logits


def test_every_batch_size_with_cuda_graphs_matches_eager(model):
    """max_num_seqs=100 is no power of two: graphs are captured for 1, 2, 4, 8, 16, ..., 96 and 100, and every
    batch size 1..100 replays one of them with padding rows that must not leak into the real ones."""
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randrange(1, 40))] for _ in range(100)]
    kwargs = dict(max_model_len=128, max_num_seqs=100, num_kvcache_blocks=1024, enable_prefix_caching=False)
    with LLM(model, **kwargs) as graphs, LLM(model, enforce_eager=True, **kwargs) as eager:
        assert 100 in graphs.model_runner.graphs and 99 not in graphs.model_runner.graphs
        worst = 0.0
        for size in range(1, 101):
            ours, reference = decode_logits(graphs, prompts[:size]), decode_logits(eager, prompts[:size])
            worst = max(worst, (ours - reference).abs().max().item())
            # bf16 rounding of another GEMM shape moves a logit by a few ulps; a padding row leaking into a real
            # one, or a wrong graph size, moves it by as much as the logits themselves.
            assert (ours - reference).abs().max().item() < 0.05 * reference.abs().max().item(), size
        print(f"\nbatch sizes 1..100, graphs vs eager: max |logit diff| {worst:.4f}")
        for llm in (graphs, eager):
            assert_drained(llm)


def test_ctrl_c_mid_decode_on_gpu(model, monkeypatch):
    prompts = [[5 + i] * (10 + 7 * i) for i in range(12)]
    with LLM(model, max_model_len=256, max_num_seqs=16, num_kvcache_blocks=512) as llm:
        expected = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        submit, calls = llm.model_runner.submit, []

        def interrupted(batch):
            calls.append(batch)
            if len(calls) == 5:
                raise KeyboardInterrupt
            return submit(batch)
        with monkeypatch.context() as patch:
            patch.setattr(llm.model_runner, "submit", interrupted)
            with pytest.raises(KeyboardInterrupt):
                llm.generate(prompts, GREEDY, use_tqdm=False)
        assert_drained(llm)
        assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
