"""Bad input fails before any work starts, with a message naming the request and the limit, and the engine
stays usable: the next generate() returns the same tokens as before."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def baseline(llm, prompts):
    return [o.token_ids for o in llm.generate(prompts[:3], GREEDY, use_tqdm=False)]


BAD_REQUESTS = {
    "empty_text": (["hello", ""], GREEDY, ValueError, ["request 1", "empty prompt"]),
    "empty_ids": ([[5, 6], []], GREEDY, ValueError, ["request 1", "empty prompt"]),
    "negative_id": ([[5, -1]], GREEDY, ValueError, ["request 0", "-1", "[0, 49216)"]),
    "id_past_vocab": ([[5, 6], [49216]], GREEDY, ValueError, ["request 1", "49216", "[0, 49216)"]),
    "float_id": ([[5, 6.0]], GREEDY, TypeError, ["request 0", "integers"]),
    "too_long": ([[5] * 100], SamplingParams(max_tokens=29), ValueError, ["request 0", "129", "max_model_len=128"]),
    "beyond_kv_cache": ([[5] * 90], SamplingParams(max_tokens=8), ValueError, ["request 0", "97", "96 tokens"]),
    "params_count": ([[5], [6]], [GREEDY] * 3, ValueError, ["3 SamplingParams", "2 prompts"]),
    "not_params": ([[5]], [{"temperature": 0}], TypeError, ["request 0", "SamplingParams"]),
    "not_prompt": ([3.5], GREEDY, TypeError, ["request 0", "string or a list of token ids"]),
    "bool_id": ([[5, True]], GREEDY, TypeError, ["request 0", "integers"]),
    "string_id": ([[5, "6"]], GREEDY, TypeError, ["request 0", "integers"]),
    "none_prompt": ([[5], None], GREEDY, TypeError, ["request 1", "string or a list of token ids"]),
    "nested_ids": ([[[5, 6]]], GREEDY, TypeError, ["request 0", "integers"]),
    "numpy_id_past_vocab": ([[np.int64(5), np.int64(49216)]], GREEDY, ValueError, ["request 0", "49216"]),
    "bad_prompt_after_good": ([[5, 6]] * 3 + [[-7]], GREEDY, ValueError, ["request 3", "-7"]),
    "prompts_not_a_list": ({"a": 1}, GREEDY, TypeError, ["prompts must be a list"]),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_leaves_engine_usable(case, llm, prompts, baseline):
    bad_prompts, params, error, words = BAD_REQUESTS[case]
    with pytest.raises(error) as info:
        llm.generate(bad_prompts, params, use_tqdm=False)
    for word in words:
        assert word in str(info.value)
    alloc = llm.scheduler.allocator
    assert llm.scheduler.is_finished() and alloc.num_sequences == 0 and alloc.num_free_blocks == alloc.num_blocks
    assert [o.token_ids for o in llm.generate(prompts[:3], GREEDY, use_tqdm=False)] == baseline


def test_whitespace_prompt_is_fine(llm):
    out = llm.generate(["   "], GREEDY, use_tqdm=False)[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_params_mutated_after_construction_are_checked(llm, prompts, baseline):
    params = SamplingParams(temperature=0, max_tokens=4)
    params.top_p = 0.0
    with pytest.raises(ValueError, match=r"request 1: top_p must be in \(0, 1\], got 0.0"):
        llm.generate(prompts[:2], [GREEDY, params], use_tqdm=False)
    assert [o.token_ids for o in llm.generate(prompts[:3], GREEDY, use_tqdm=False)] == baseline


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=math.nan), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_k=0), "top_k must be -1"),
    (dict(top_k=-2), "top_k must be -1"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)


def test_unknown_keywords():
    with pytest.raises(TypeError):
        SamplingParams(temprature=0.5)


def test_unknown_llm_keyword(tiny_models):
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(tiny_models["qwen3"], device="cpu", max_num_seq=4)


def test_max_model_len_beyond_model(tiny_models):
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds the model's max_position_embeddings=2048"):
        LLM(tiny_models["qwen3"], device="cpu", max_model_len=4096)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"))


def _copy_without_weights(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return folder


def test_no_safetensors(tiny_models, tmp_path):
    folder = _copy_without_weights(tiny_models, tmp_path)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        LLM(str(folder), device="cpu")


def test_unsupported_architecture(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'MistralForCausalLM'"):
        LLM(str(folder), device="cpu")


@pytest.mark.parametrize("tensor", ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight",
                                    "model.norm.weight"])
def test_wrong_weight_shape(tiny_models, tmp_path, tensor):
    from safetensors.torch import load_file, save_file
    folder = _copy_without_weights(tiny_models, tmp_path)
    weights = load_file(os.path.join(tiny_models["qwen3"], "model.safetensors"))
    weights[tensor] = torch.cat([weights[tensor], weights[tensor][:1]])
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        LLM(str(folder), device="cpu")
    assert "model.safetensors" in str(info.value) and tensor in str(info.value)


def test_missing_weight(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = _copy_without_weights(tiny_models, tmp_path)
    weights = load_file(os.path.join(tiny_models["qwen3"], "model.safetensors"))
    del weights["model.layers.0.self_attn.v_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights for \['model.layers.0.self_attn.qkv_proj.weight\[v\]'\]"):
        LLM(str(folder), device="cpu")


def test_sharded_checkpoint(tiny_models, tmp_path, prompts, hf_reference):
    from transformers import AutoModelForCausalLM
    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).save_pretrained(folder, max_shard_size="2MB")
    shutil.copy(os.path.join(tiny_models["llama"], "tokenizer.json"), folder)
    shutil.copy(os.path.join(tiny_models["llama"], "tokenizer_config.json"), folder)
    assert len(list(folder.glob("*.safetensors"))) > 1
    with LLM(str(folder), device="cpu", max_model_len=256) as llm:
        outputs = llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                               use_tqdm=False)
    assert [o.token_ids for o in outputs] == hf_reference("llama")[:4]
