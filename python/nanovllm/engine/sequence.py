"""One request as the engine tracks it."""

from itertools import count

from nanovllm.sampling_params import SamplingParams


class Sequence:
    _ids = count()

    def __init__(self, token_ids: list[int], params: SamplingParams, seed: int):
        self.seq_id = next(Sequence._ids)
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.seed = seed
        # Tokens whose KV is computed or scheduled in the current step; 0 while the sequence holds no blocks.
        self.num_computed_tokens = 0
        # 1 while a step planned ahead holds a slot for the token the running step samples (its id not known yet).
        self.num_pending_tokens = 0
        self.admitted = False
        self.finish_reason: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]
