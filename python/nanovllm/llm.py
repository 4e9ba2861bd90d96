from nanovllm.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    """LLM(model_path, tensor_parallel_size=1, max_model_len=None, max_num_seqs=512, max_num_batched_tokens=16384,
    gpu_memory_utilization=0.9, kvcache_block_size=16, enforce_eager=False, enable_prefix_caching=True,
    dtype="auto", device="auto", num_kvcache_blocks=None)

    model_path: a Hugging Face model folder (config.json, *.safetensors, tokenizer files).
    num_kvcache_blocks fixes the KV cache size instead of measuring free memory (tests use it).
    """
