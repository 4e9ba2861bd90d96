"""Engine configuration: the user's limits checked against the model's before anything is loaded."""

import os
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, PretrainedConfig

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "LlamaForCausalLM")


@dataclass
class Config:
    model: str
    tensor_parallel_size: int = 1
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 512
    max_num_batched_tokens: int = 16384
    gpu_memory_utilization: float = 0.9
    kvcache_block_size: int = 16
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    # Fixes the KV cache size instead of measuring free memory (tests use it to force preemption).
    num_kvcache_blocks: int | None = None
    hf_config: PretrainedConfig = field(init=False)

    def __post_init__(self):
        if not os.path.isdir(self.model):
            raise FileNotFoundError(f"model folder {self.model!r} does not exist")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise FileNotFoundError(f"model folder {self.model!r} has no config.json")
        self.hf_config = AutoConfig.from_pretrained(self.model)
        arch = (getattr(self.hf_config, "architectures", None) or ["<none>"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{self.model}: unsupported architecture {arch!r} "
                             f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        limit = self.hf_config.max_position_embeddings
        if self.max_model_len is None:
            self.max_model_len = limit
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "kvcache_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={limit}")
        utilization = self.gpu_memory_utilization
        if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization!r}")
        blocks = self.num_kvcache_blocks
        if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1):
            raise ValueError(f"num_kvcache_blocks must be >= 1, got {blocks!r}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = str(torch.device(self.device))
        self.dtype = self._resolve_dtype()
        self._check_tensor_parallel()

    def _check_tensor_parallel(self) -> None:
        n = self.tensor_parallel_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {n!r}")
        if n == 1:
            return
        if self.device.startswith("cuda"):
            if self.device not in ("cuda", "cuda:0"):
                raise ValueError(f"tensor_parallel_size={n} puts rank r on cuda:r; device={self.device!r} must be "
                                 "'cuda' or 'cuda:0'")
            if n > torch.cuda.device_count():
                raise ValueError(f"tensor_parallel_size={n} exceeds the {torch.cuda.device_count()} visible GPUs")
            self.device = "cuda:0"
        hf = self.hf_config
        kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        for name, value in (("num_attention_heads", hf.num_attention_heads),
                            ("intermediate_size", hf.intermediate_size)):
            if value % n:
                raise ValueError(f"{self.model}: {name}={value} is not divisible by tensor_parallel_size={n}")
        if kv_heads % n and n % kv_heads:  # fewer kv heads than ranks: each is replicated on n / kv_heads ranks
            raise ValueError(f"{self.model}: num_key_value_heads={kv_heads} and tensor_parallel_size={n}: one "
                             "must divide the other")

    def _resolve_dtype(self) -> torch.dtype:
        if isinstance(self.dtype, torch.dtype) or self.dtype != "auto":
            dtype = self.dtype if isinstance(self.dtype, torch.dtype) else getattr(torch, str(self.dtype), None)
            if dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise ValueError(f"dtype must be 'auto', 'float16', 'bfloat16' or 'float32', got {self.dtype!r}")
            return dtype
        if not self.device.startswith("cuda"):
            return torch.float32  # CPU matmuls in half precision are slow and the references compute in fp32
        dtype = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.kvcache_block_size)
