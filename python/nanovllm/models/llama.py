"""Llama-family decoder (LlamaForCausalLM: SmolLM2, Llama 3). Qwen3 adds per-head q/k RMSNorm (models/qwen3.py)."""

import torch
from torch import nn

from nanovllm.layers.attention import Attention, QKPrologue
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, add_norm_linear
from nanovllm.layers.rotary import RotaryEmbedding, rope_settings


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DecoderAttention(nn.Module):
    def __init__(self, config, qk_norm: bool, rotary_emb: RotaryEmbedding):
        super().__init__()
        head_dim = head_dim_of(config)
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.head_dim = head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, bias=bias)
        self.rotary_emb = rotary_emb  # one cos/sin cache shared by all layers
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, head_dim ** -0.5)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps) if qk_norm else None
        self.norm_eps = config.rms_norm_eps

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: the output of qkv_proj (the decoder layer applies it, fused with the norm before it)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], -1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        norms = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else (None, None)
        out = self.attn(positions, q, k, v, QKPrologue(*norms, self.rotary_emb.cos_sin_cache, self.norm_eps))
        return self.o_proj(out.flatten(1, 2))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias)
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} (only silu)")

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: the output of gate_up_proj (the decoder layer applies it, fused with the norm before it)."""
        return self.down_proj.forward_silu_mul(gate_up)


class DecoderLayer(nn.Module):
    def __init__(self, config, qk_norm: bool, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.self_attn = DecoderAttention(config, qk_norm, rotary_emb)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual):
        qkv, residual = add_norm_linear(hidden, residual, self.input_layernorm, self.self_attn.qkv_proj)
        hidden = self.self_attn(positions, qkv)
        gate_up, residual = add_norm_linear(hidden, residual, self.post_attention_layernorm, self.mlp.gate_up_proj)
        return self.mlp(gate_up), residual


class DecoderModel(nn.Module):
    def __init__(self, config, qk_norm: bool):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        base, scaling = rope_settings(config)
        rotary_emb = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings, base, scaling)
        self.layers = nn.ModuleList(DecoderLayer(config, qk_norm, rotary_emb) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                id_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states of input_ids, or of input_ids[id_rows] when id_rows is given."""
        hidden, residual = self.embed_tokens(input_ids, id_rows), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    qk_norm = False
    # checkpoint name -> (fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config):
        super().__init__()
        self.model = DecoderModel(config, self.qk_norm)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                id_rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, id_rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
