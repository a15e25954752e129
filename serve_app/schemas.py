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


class _GenerationRequest(BaseModel):
    # Unknown fields are ignored like OpenAI's own server does (clients send `user`, penalties, ...).
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    expert: str | None = None
    expert_weights: dict[str, float] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


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
        kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}.get(
            self.status, "invalid_request_error"
        )
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list[str]", "dict[str,float]", "StreamOptions", "none"}


def parse(model: type[BaseModel], data) -> BaseModel:
    """Validate ``data`` into ``model`` or raise a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}.")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        # Union members appear in `loc` by type name (`prompt.str`); the user only knows the field.
        param = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or p not in _TYPE_TAGS) or None
        if first["type"] == "missing":
            message = f"`{param}` is required."
        else:
            message = f"`{param}`: {first['msg']} (got {first.get('input')!r})."
        raise APIError(400, message, param=param, code=first["type"]) from None
