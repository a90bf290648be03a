"""stablelm-fast: an inference engine for Stability AI's StableLM family (1.6B, 3B and 12B)."""

import torch  # noqa: F401  (loads libtorch before the C++ extension)

from stablelm_fast.async_llm import AsyncLLM
from stablelm_fast.engine.exceptions import EngineDeadError
from stablelm_fast.llm import LLM
from stablelm_fast.outputs import CompletionOutput, RequestOutput
from stablelm_fast.sampling_params import SamplingParams
from stablelm_fast.structured_outputs import StructuredOutputsParams

__all__ = ["LLM", "AsyncLLM", "EngineDeadError", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
