"""nano-vLLM C++: offline LLM inference. `from nanovllm import LLM, SamplingParams`."""

from nanovllm.engine.llm_engine import RequestOutput
from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
