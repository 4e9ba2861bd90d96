"""Per-request sampling settings (vLLM's offline API)."""

import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = -1           # -1 = whole vocabulary
    top_p: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None   # same seed -> same tokens, whatever else is in the batch

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "SamplingParams") -> None:
        def bad(msg):
            raise ValueError(f"{where}: {msg}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"{where}: temperature must be a number, got {self.temperature!r}")
        if math.isnan(self.temperature) or self.temperature < 0:
            bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k == 0 or self.top_k < -1:
            bad(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids}")
        if self.seed is not None and not _is_int(self.seed):
            raise TypeError(f"{where}: seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
