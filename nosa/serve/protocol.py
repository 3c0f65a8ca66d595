"""The request bodies of the OpenAI-compatible API (pydantic v2) and OpenAI's error shape.

Only what the engine can honour is accepted. Fields that OpenAI defines but this server cannot honour
(penalties, logit_bias, best_of, echo, suffix, tools) are refused with a 400 naming the field when given a
non-default value, rather than silently ignored; fields OpenAI does not define are ignored, as OpenAI's
own server and the common compatible servers do (clients send vendor extras).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationInfo, field_validator

# Most stop strings a request may carry, and most top logprobs: OpenAI's own limits.
MAX_STOP_STRINGS = 4
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
MAX_CHOICES = 16


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _refused(fields: tuple[str, ...], message: str):
    """A field validator for OpenAI fields this server cannot honour: a non-default (truthy) value is refused
    with `message`, so the 400 names the field; the default (0, None, False, empty) passes."""

    def refuse(cls, value):
        if value:
            raise ValueError(message)
        return value

    return field_validator(*fields)(classmethod(refuse))


def _null_is_default(*fields: str):
    """A before-validator: an explicit JSON null in these fields means their default. OpenAI's schema lets
    them be null, and the official client sends null for every argument a caller passes as None."""

    def default_for_null(cls, value, info: ValidationInfo):
        return cls.model_fields[info.field_name].get_default(call_default_factory=True) if value is None else value

    return field_validator(*fields, mode="before")(classmethod(default_for_null))


def _needs(field: str, other: str, message: str):
    """A field validator: `field` may only be given (not None) when the earlier field `other` is true."""

    def check(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get(other, False):
            raise ValueError(message)
        return value

    return field_validator(field)(classmethod(check))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: StrictInt | None = None
    stop: Union[str, list[str], None] = Field(None, validate_default=True)  # always a list after validation
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Not OpenAI's; vLLM's extension of the same name: keep generating past the end-of-sequence token
    # (benchmarks use it for fixed output lengths).
    ignore_eos: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    # Field validators rather than one model validator, so each error's location names its field.
    _no_penalty = _refused(("presence_penalty", "frequency_penalty"),
                           "penalties are not supported by this server (give 0 or leave it out)")
    _no_logit_bias = _refused(("logit_bias",), "logit_bias is not supported by this server")

    _options_need_stream = _needs("stream_options", "stream", "stream_options is only allowed when stream is true")
    _nulls = _null_is_default("n", "temperature", "top_p", "stream", "presence_penalty", "frequency_penalty",
                              "ignore_eos")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


PromptType = Union[str, list[str], list[StrictInt], list[list[StrictInt]]]


class CompletionRequest(_Sampling):
    prompt: PromptType
    max_tokens: StrictInt = Field(16, ge=1)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value):
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and value and isinstance(value[0], list) and any(len(p) == 0 for p in value):
            raise ValueError("token-id prompts must not be empty")
        return value

    _completion_nulls = _null_is_default("max_tokens", "echo")
    _no_echo = _refused(("echo",), "echo is not supported by this server")
    _no_suffix = _refused(("suffix",), "suffix is not supported by this server")

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value, info: ValidationInfo):
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of is not supported by this server (leave it out or equal to n)")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (each a string or a list of token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict], None] = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value):
        for part in value if isinstance(value, list) else []:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
        return value

    def text(self) -> str:
        """The message content as text (text content parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    tools: list | None = None

    _chat_nulls = _null_is_default("logprobs")
    _top_needs_logprobs = _needs("top_logprobs", "logprobs", "top_logprobs needs logprobs to be true")
    _no_tools = _refused(("tools",), "tools are not supported by this server")

    def token_budget(self, default: int) -> int:
        """max_completion_tokens (the newer name) or max_tokens, else `default`."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens if self.max_tokens is not None else default
