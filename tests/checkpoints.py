"""Tiny random Qwen3 / Llama checkpoints saved as Hugging Face model folders, and a greedy reference."""

import os
import shutil

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def tokenizer_dir() -> str:
    """A folder with tokenizer files: $NANOVLLM_TEST_TOKENIZER, else the converted SmolLM2 (converted on first use)."""
    path = os.environ.get("NANOVLLM_TEST_TOKENIZER")
    if path:
        return path
    from nanovllm.utils.smollm2 import smollm2_path
    return smollm2_path()


def copy_tokenizer(target: str) -> None:
    source = tokenizer_dir()
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), target)


def qwen3_config(**overrides):
    from transformers import Qwen3Config
    settings = dict(vocab_size=49152 + 64,  # larger than the tokenizer, as in the real Qwen3
                    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, initializer_range=0.08, bos_token_id=1, eos_token_id=2)
    settings.update(overrides)
    return Qwen3Config(**settings)


def llama_config(**overrides):
    from transformers import LlamaConfig
    settings = dict(vocab_size=49152, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, initializer_range=0.08, bos_token_id=1, eos_token_id=2,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 256})
    settings.update(overrides)
    return LlamaConfig(**settings)


def save_random_model(config, target: str, dtype=torch.float32, seed: int = 0) -> str:
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(target)
    copy_tokenizer(target)
    return target


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt by full forwards (no KV cache: the plainest reference)."""
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for _ in range(max_new_tokens):
                next_id = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            outputs.append(ids[0, len(prompt):].tolist())
    return outputs
