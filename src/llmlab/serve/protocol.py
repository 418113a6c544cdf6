"""OpenAI's request bodies (the fields this server honours) and its error object.

Bodies are checked by pydantic in strict mode (a string is not a number, true is not 1, NaN and
infinities are refused); unknown fields are ignored, as clients send many (`user`, ...), but
fields that would change the answer and are not implemented (n > 1, logprobs, penalties, tools,
...) are refused with a 400 rather than silently dropped.
"""
from __future__ import annotations

import json
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOPS = 4  # OpenAI's limit on stop strings


class ApiError(Exception):
    """A request the server refuses: `status` and an OpenAI-style error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


NonEmpty = Annotated[str, Field(min_length=1)]


class _Request(_Strict):
    model: str
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    temperature: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    top_p: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    top_k: Optional[Annotated[int, Field(ge=1)]] = None
    seed: Optional[Annotated[int, Field(ge=0, lt=2**63)]] = None
    stop: Optional[Union[NonEmpty, Annotated[list[NonEmpty], Field(max_length=MAX_STOPS)]]] = None
    n: Optional[Literal[1]] = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # refused unless left at their no-op values (see unsupported())
    logprobs: Optional[Union[bool, int]] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> Optional[str]:
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                return name
        return "logit_bias" if self.logit_bias else None


class CompletionRequest(_Request):
    prompt: Union[str, list[Annotated[int, Field(ge=0)]], Annotated[list[str], Field(min_length=1, max_length=1)],
                  Annotated[list[list[Annotated[int, Field(ge=0)]]], Field(min_length=1, max_length=1)]]
    echo: bool = False
    best_of: Optional[Literal[1]] = None
    suffix: Optional[str] = None

    def unsupported(self) -> Optional[str]:
        return "echo" if self.echo else "suffix" if self.suffix else super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    tools: Optional[list] = None
    response_format: Optional[dict] = None

    def unsupported(self) -> Optional[str]:
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        return super().unsupported()


def parse(cls: type[_Request], body: bytes) -> _Request:
    """A request object from raw body bytes, or ApiError(400) saying what is wrong."""
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(400, f"{where}: {err['msg']}" if where else err["msg"], param=where) from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    bad = req.unsupported()
    if bad:
        raise ApiError(400, f"{bad} is not supported by this server", param=bad)
    return req


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")
