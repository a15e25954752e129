"""OpenAI-compatible request schemas and error objects.

Fields are validated strictly (a string where a number belongs is an error, not a coercion), and
every problem becomes ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status, the
shape OpenAI and vLLM return, so clients show a message that names the field.

loramix extensions: ``expert`` pins one expert; ``expert_weights`` ``{name: weight}`` mixes
experts explicitly (normalised to sum 1). Responses add ``route`` to every choice.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


# OpenAI parameters loramix does not implement: accepted only at their "off" values, refused with a
# 400 naming them otherwise (silently ignoring `logprobs` or `tools` would return something else
# than the client asked for). `user` and `metadata` are bookkeeping and always accepted.
NOT_IMPLEMENTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "modalities": (None, ["text"]),
}
BOOKKEEPING = {"user", "metadata"}
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 1e-3  # below it softmax(logits / T) over/underflows to NaN: send 0 for greedy


class _GenerationRequest(BaseModel):
    # Unknown fields are refused before validation (see `parse`); the ones that pass are ours.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    expert: str | None = None
    expert_weights: dict[str, float] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def check_stop(self, max_count: int, max_chars: int) -> None:
        stops = self.stop_strings()
        if len(stops) > max_count:
            raise APIError(400, f"`stop` takes at most {max_count} strings, got {len(stops)}.", "stop")
        for s in stops:
            if not s:
                raise APIError(400, "`stop` strings must not be empty.", "stop")
            if len(s) > max_chars:
                raise APIError(400, f"`stop` strings are at most {max_chars} characters, got {len(s)}.", "stop")


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class APIError(Exception):
    """A request problem the client can fix; becomes an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kinds = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}
        kind = "server_error" if self.status >= 500 else kinds.get(self.status, "invalid_request_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        if self.status == 503:
            headers = {"Retry-After": "1"}
        return JSONResponse(body, status_code=self.status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list[str]", "dict[str,float]", "StreamOptions", "none"}


def _unsupported(model: type[BaseModel], data: dict) -> None:
    for key, value in data.items():
        if key in model.model_fields or key in BOOKKEEPING:
            continue
        if key in NOT_IMPLEMENTED:
            if value is None or any(value == ok and type(value) is type(ok) for ok in NOT_IMPLEMENTED[key]):
                continue
            message = f"`{key}` is not supported by this server (got {value!r}); leave it out."
            raise APIError(400, message, key, code="unsupported_parameter")
        raise APIError(400, f"unrecognized request argument `{key}`.", key, code="unrecognized_parameter")


def _lone_surrogate(value, path: str = "") -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate (JSON allows "\\ud800"; UTF-8 does not)."""
    if isinstance(value, str):
        return path if any("\ud800" <= c <= "\udfff" for c in value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _lone_surrogate(key) is not None:
            return f"{path}.{key}".strip(".") or "body"
        found = _lone_surrogate(item, f"{path}.{key}".strip("."))
        if found is not None:
            return found
    return None


def parse(model: type[BaseModel], data) -> BaseModel:
    """Validate ``data`` into ``model`` or raise a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}.")
    bad = _lone_surrogate(data)
    if bad is not None:
        raise APIError(400, f"`{bad}` holds an invalid Unicode character (a lone surrogate).", bad or None)
    _unsupported(model, data)
    try:
        request = model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        # Union members appear in `loc` by type name (`prompt.str`); the user only knows the field.
        param = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or p not in _TYPE_TAGS) or None
        if first["type"] == "missing":
            message = f"`{param}` is required."
        else:
            message = f"`{param}`: {first['msg']} (got {first.get('input')!r})."
        raise APIError(400, message, param=param, code=first["type"]) from None
    if 0 < request.temperature < MIN_TEMPERATURE:
        message = f"`temperature` must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {request.temperature}."
        raise APIError(400, message, "temperature")
    return request
