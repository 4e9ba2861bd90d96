"""Decode steps planned ahead (Scheduler.schedule_ahead, LLMEngine.step): while a decode step runs, the next one is
planned and launched before its tokens are read. The tokens must be those of running one step at a time, under
seeded sampling, top-k / top-p, stop tokens, EOS and a full KV cache, and every block must come back."""

import pytest

from conftest import MAX_NEW_TOKENS
from nanovllm import LLM, SamplingParams
from nanovllm_cpp import BlockAllocator


def assert_drained(llm) -> None:
    alloc = llm.scheduler.allocator
    assert not llm.has_work() and alloc.num_sequences == 0 and alloc.num_free_blocks == alloc.num_blocks


def count_planned_steps(llm, monkeypatch) -> list[int]:
    """Appends the size of every step planned ahead to the returned list."""
    planned, schedule_ahead = [], llm.scheduler.schedule_ahead

    def spy(batch):
        ahead = schedule_ahead(batch)
        if ahead is not None:
            planned.append(len(ahead.seqs))
        return ahead
    monkeypatch.setattr(llm.scheduler, "schedule_ahead", spy)
    return planned


def mixed_params(hf_tokens: list[list[int]]) -> list[SamplingParams]:
    """Seeded sampling with and without top-k / top-p, and greedy requests that stop early on a token they are
    known to generate (as EOS would), with various max_tokens."""
    params = []
    for i, expected in enumerate(hf_tokens):
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0.8, max_tokens=5 + 3 * i, ignore_eos=True, seed=100 + i))
        elif i % 3 == 1:
            params.append(SamplingParams(temperature=1.2, top_k=20, top_p=0.9, max_tokens=MAX_NEW_TOKENS,
                                         ignore_eos=True, seed=200 + i))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True,
                                         stop_token_ids=[expected[2 + i % 5]]))
    return params


@pytest.mark.parametrize("settings", [dict(), dict(num_kvcache_blocks=14), dict(kvcache_block_size=8)],
                         ids=["ample_cache", "tight_cache", "block8"])
def test_planned_ahead_equals_one_step_at_a_time(settings, tiny_models, prompts, hf_reference, monkeypatch):
    expected_greedy = hf_reference("qwen3")
    params = mixed_params(expected_greedy)
    with LLM(tiny_models["qwen3"], device="cpu", max_model_len=256, **settings) as llm:
        planned = count_planned_steps(llm, monkeypatch)
        ahead = llm.generate(prompts, params, use_tqdm=False)
        assert_drained(llm)
        assert planned, "no decode step was planned ahead"
        monkeypatch.setattr(llm.scheduler, "schedule_ahead", lambda batch: None)
        one_at_a_time = llm.generate(prompts, params, use_tqdm=False)
        assert_drained(llm)
    assert [(o.token_ids, o.finish_reason) for o in ahead] == [(o.token_ids, o.finish_reason) for o in one_at_a_time]
    for i, (out, p) in enumerate(zip(ahead, params)):
        if p.stop_token_ids:
            stop = p.stop_token_ids[0]
            assert out.finish_reason == "stop" and out.token_ids == expected_greedy[i][:expected_greedy[i].index(stop) + 1]
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == p.max_tokens


def test_a_sequence_finished_by_the_running_step_drops_its_planned_token(tiny_models, prompts, hf_reference):
    expected = hf_reference("qwen3")[0]
    with LLM(tiny_models["qwen3"], device="cpu", max_model_len=256) as llm:
        llm.scheduler.eos_token_ids = {expected[4]}  # unknown to the planner: the step after it is already planned
        out = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS), use_tqdm=False)[0]
        assert out.token_ids == expected[:expected.index(expected[4]) + 1] and out.finish_reason == "eos"
        assert_drained(llm)


# ---------------------------------------------------------------- the allocator's pending tokens


def test_pending_token_takes_its_slot_now_and_is_hashed_when_filled():
    bs = 8
    a = BlockAllocator(4, bs)
    tokens = list(range(1, bs))  # one short of a full block
    a.allocate(0, tokens)
    a.commit(0, len(tokens))
    a.append_pending_all([0])
    assert a.has_pending(0) and a.num_tokens(0) == bs and a.block_table(0) == [0]
    assert not a.is_cached(0)  # full, but its last token is not known yet
    with pytest.raises(ValueError, match="cannot commit 8 of 7 known tokens"):
        a.commit(0, bs)
    a.fill_pending(0, 42)
    assert not a.has_pending(0) and a.is_cached(0)
    assert a.block_hash(0) == BlockAllocator.chain_hash(BlockAllocator.ROOT_HASH, tokens + [42])
    a.append_pending_all([0])  # the next token starts block 1
    assert a.block_table(0) == [0, 1] and a.num_free_blocks == 2
    a.free(0)
    assert a.num_free_blocks == 4 and a.num_sequences == 0


def test_pending_tokens_are_one_per_sequence_and_all_or_nothing():
    a = BlockAllocator(3, 8)
    a.allocate(0, list(range(8)))  # full: its next token needs a block
    a.allocate(1, list(range(3)))
    a.append_pending_all([1])
    for call in (lambda: a.append_pending_all([1]), lambda: a.append(1, 5), lambda: a.append_all([1], [5])):
        with pytest.raises(ValueError, match="sequence 1 already has a pending token"):
            call()
    with pytest.raises(ValueError, match="sequence 0 has no pending token"):
        a.fill_pending(0, 3)
    with pytest.raises(ValueError, match="negative"):
        a.fill_pending(1, -1)
    a.fill_pending(1, 9)
    a.allocate(2, list(range(10, 18)))  # takes the last free block
    assert a.num_free_blocks == 0
    with pytest.raises(RuntimeError, match="append_pending_all: not enough free blocks for 2 sequences"):
        a.append_pending_all([1, 0])
    assert not a.has_pending(1) and a.num_tokens(1) == 4 and a.num_tokens(0) == 8
