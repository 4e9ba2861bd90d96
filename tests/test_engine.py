"""Greedy tokens of the engine on the CPU (fp32) equal transformers' for tiny random Qwen3 and Llama models,
whatever the scheduling: prefix caching on/off, preemption, chunked prefill, few sequences at a time."""

import pytest

from conftest import MAX_NEW_TOKENS
from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)

SCHEDULES = {
    "prefix_cache": dict(),
    "no_prefix_cache": dict(enable_prefix_caching=False),
    "preemption": dict(num_kvcache_blocks=14),
    "chunked_prefill": dict(max_num_batched_tokens=16),
    "chunked_preemption_no_cache": dict(max_num_batched_tokens=24, num_kvcache_blocks=14,
                                        enable_prefix_caching=False),
    "few_seqs_block8": dict(max_num_seqs=3, kvcache_block_size=8),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("model", ["qwen3", "llama"])
def test_greedy_matches_transformers(model, schedule, tiny_models, prompts, hf_reference):
    with LLM(tiny_models[model], device="cpu", max_model_len=256, **SCHEDULES[schedule]) as llm:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.token_ids for o in outputs] == hf_reference(model)
        assert all(o.finish_reason == "length" for o in outputs)
        if "preemption" in schedule:
            assert llm.num_preemptions > 0
        stats = llm.scheduler.allocator.stats
        if llm.config.enable_prefix_caching:
            assert stats.hit_tokens >= 2 * 48 - 16  # the prompts sharing a 48-token prefix reuse its blocks
        else:
            assert stats.hit_tokens == 0
        # Everything is freed once generate() returns.
        assert llm.scheduler.allocator.num_sequences == 0


def test_prefix_cache_hits_on_repeat(tiny_models, prompts, hf_reference):
    with LLM(tiny_models["qwen3"], device="cpu", max_model_len=256) as llm:
        first = llm.generate(prompts, GREEDY, use_tqdm=False)
        hits = llm.scheduler.allocator.stats.hit_tokens
        second = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert llm.scheduler.allocator.stats.hit_tokens - hits >= sum(len(p) // 16 * 16 - 16 for p in prompts)
        assert [o.token_ids for o in second] == [o.token_ids for o in first] == hf_reference("qwen3")


def test_per_prompt_params_and_order(tiny_models, prompts, hf_reference):
    with LLM(tiny_models["llama"], device="cpu", max_model_len=256) as llm:
        lengths = [1 + i % 7 for i in range(len(prompts))]
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        expected = hf_reference("llama")
        assert [o.token_ids for o in outputs] == [e[:n] for e, n in zip(expected, lengths)]
        assert [o.prompt_token_ids for o in outputs] == prompts


def test_stop_tokens_and_eos(tiny_models, prompts, hf_reference):
    expected = hf_reference("qwen3")[6]
    with LLM(tiny_models["qwen3"], device="cpu", max_model_len=256) as llm:
        stop = expected[5]
        cut = expected.index(stop) + 1
        out = llm.generate([prompts[6]], SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True,
                                                        stop_token_ids=[stop]), use_tqdm=False)[0]
        assert out.token_ids == expected[:cut] and out.finish_reason == "stop"
        # Every id the generation config lists ends a request, not only the first one.
        llm.eos_token_ids.update({expected[3]})
        llm.scheduler.eos_token_ids = llm.eos_token_ids
        out = llm.generate([prompts[6]], SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS),
                           use_tqdm=False)[0]
        assert out.token_ids == expected[: expected.index(expected[3]) + 1] and out.finish_reason == "eos"


def test_eos_list_from_generation_config(tmp_path, tiny_models):
    import json
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3"], folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 11]}))
    with LLM(str(folder), device="cpu", max_model_len=256) as llm:
        assert llm.eos_token_ids == {2, 7, 11}


def test_sampling_is_seeded_per_request(tiny_models, prompts):
    with LLM(tiny_models["qwen3"], device="cpu", max_model_len=256) as llm:
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, max_tokens=16, ignore_eos=True, seed=7)
        alone = llm.generate([prompts[4]], params, use_tqdm=False)[0].token_ids
        others = SamplingParams(temperature=0.7, max_tokens=20, ignore_eos=True)
        mixed = llm.generate([prompts[0], prompts[4], prompts[8]], [others, params, others], use_tqdm=False)
        assert mixed[1].token_ids == alone
        reseeded = llm.generate([prompts[4]], SamplingParams(temperature=1.0, top_k=50, top_p=0.95, max_tokens=16,
                                                             ignore_eos=True, seed=8), use_tqdm=False)[0]
        assert reseeded.token_ids != alone


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_models, prompts, hf_reference):
    with LLM(tiny_models["llama"], device="cpu", max_model_len=256) as llm:
        greedy = [e[:8] for e in hf_reference("llama")[:4]]
        for params in (SamplingParams(temperature=1.5, top_k=1, max_tokens=8, ignore_eos=True),
                       SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=8, ignore_eos=True)):
            assert [o.token_ids for o in llm.generate(prompts[:4], params, use_tqdm=False)] == greedy


def test_sampler_follows_the_distribution():
    import torch
    from nanovllm.layers.sampler import Sampler
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]])).repeat(4000, 1)
    n = logits.shape[0]
    tokens = Sampler()(logits, torch.ones(n), torch.full((n,), 4), torch.ones(n), torch.arange(n), filtered=False)
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.03)
    top_p = Sampler()(logits, torch.ones(n), torch.full((n,), 4), torch.full((n,), 0.7), torch.arange(n), filtered=True)
    assert set(top_p.tolist()) == {0, 1}
