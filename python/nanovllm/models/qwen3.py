from nanovllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama's decoder with an RMSNorm over each q and k head before the rotary embedding."""
    qk_norm = True
