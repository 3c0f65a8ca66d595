"""NOSI, the offloading inference engine (spec sec. 6): `LLM(...).generate(prompts, SamplingParams(...))`."""

from nosa.engine.llm import LLM, EngineStats
from nosa.engine.sampling import SamplingParams
from nosa.engine.sequence import RequestOutput, StepOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput", "EngineStats", "StepOutput"]
