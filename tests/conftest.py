import random

import pytest
import torch

from checkpoints import hf_greedy, llama_config, qwen3_config, save_random_model

MAX_NEW_TOKENS = 32


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Random fp32 Qwen3 (tied, head_dim 64) and Llama (untied, head_dim 32, llama3 rope scaling) folders."""
    root = tmp_path_factory.mktemp("models")
    return {"qwen3": save_random_model(qwen3_config(), str(root / "qwen3"), seed=1),
            "llama": save_random_model(llama_config(), str(root / "llama"), seed=2)}


@pytest.fixture(scope="module")
def llm(tiny_models):
    """A small CPU engine (tiny Qwen3, 6 KV blocks of 16 tokens) for request-validation tests."""
    from nanovllm import LLM
    with LLM(tiny_models["qwen3"], device="cpu", max_model_len=128, num_kvcache_blocks=6) as llm:
        yield llm


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    """Mixed lengths (1 to 150 tokens, some across block boundaries) and two pairs sharing long prefixes."""
    rng = random.Random(0)
    lengths = [1, 5, 16, 17, 40, 75, 150, 3, 33]
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in lengths]
    shared = [rng.randrange(3, 49152) for _ in range(48)]
    prompts += [shared + [rng.randrange(3, 49152) for _ in range(n)] for n in (1, 9, 20)]
    return prompts


@pytest.fixture(scope="session")
def hf_reference(tiny_models, prompts):
    """Greedy transformers continuations, computed once per model."""
    from transformers import AutoModelForCausalLM
    cache = {}

    def get(name: str) -> list[list[int]]:
        if name not in cache:
            model = AutoModelForCausalLM.from_pretrained(tiny_models[name], dtype=torch.float32).eval()
            cache[name] = hf_greedy(model, prompts, MAX_NEW_TOKENS)
        return cache[name]
    return get
