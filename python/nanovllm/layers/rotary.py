from torch import nn

from nanovllm_cpp.reference import rotary_cos_sin_cache


class RotaryEmbedding(nn.Module):
    """The cos/sin table of the NeoX rotary embedding (applied by nanovllm_cpp.qk_norm_rotary_store)."""

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None):
        super().__init__()
        self.register_buffer("cos_sin_cache", rotary_cos_sin_cache(head_dim, max_position, base, scaling),
                             persistent=False)


def rope_settings(hf_config) -> tuple[float, dict | None]:
    """(base, scaling dict) from either transformers 5's rope_parameters or the older rope_theta/rope_scaling."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        return float(params.get("rope_theta", 10000.0)), dict(params)
    return float(getattr(hf_config, "rope_theta", 10000.0)), getattr(hf_config, "rope_scaling", None)

