"""The OpenAI-compatible surface: request schemas, OpenAI's error shape, response and stream-chunk bodies.

Requests are validated here, so a bad parameter is a 400 naming it (never FastAPI's 422); features
we do not serve (n > 1, logprobs, penalties, tools) are refused by name instead of being ignored.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.parsing import hide_credentials
from serving.chat import Message
from serving.engine import SamplingParams

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # per stop string: every stop is searched for in the text after each token, on the decode thread
MAX_PROMPT_CHARS = 200_000  # a prompt (or a chat's messages together); checked before anything tokenizes it
MAX_BODY_BYTES = 2 * 1024 * 1024  # any request body; a prompt at the cap fits in it even with JSON escapes
SEED_RANGE = (-(2**63), 2**63 - 1)  # what every engine's generator takes (a 64-bit signed integer)
ModelT = TypeVar("ModelT", bound=BaseModel)


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}; a URL's `user:pass@` in
    the message (a tracking URI named by a 503) is never sent."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(status, message, type, code, param, retry_after_s)  # all args: survives pickling across Ray
        self.status, self.message, self.type, self.code = status, hide_credentials(message), type, code
        self.param, self.retry_after_s = param, retry_after_s

    def body(self) -> dict[str, Any]:
        """The JSON body (also sent as a stream's last event when a stream fails midway)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The HTTP answer, with Retry-After for overload."""
        headers = {"Retry-After": str(max(1, round(self.retry_after_s)))} if self.retry_after_s is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def model_not_found(model: str, known: list[str]) -> APIError:
    """404 for a model id this endpoint does not serve."""
    hint = f"; served: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}" if known else ""
    return APIError(404, f"The model {model!r} does not exist or is not served here{hint}",
                    code="model_not_found", param="model")


def from_validation_error(error: ValidationError) -> APIError:
    """400 naming the first bad parameter (e.g. `messages[0].role`)."""
    first = error.errors()[0]
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".") or None
    message = "unknown parameter" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def parse_request(schema: type[ModelT], body: Any) -> ModelT:
    """Validate a JSON body against `schema`, raising a 400 APIError."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(body)
    except ValidationError as error:
        raise from_validation_error(error) from None


async def read_body(request: Request, schema: type[ModelT], json_type_required: bool = False) -> ModelT:
    """The request's JSON body validated against `schema`: a 413 beyond MAX_BODY_BYTES (read no further), a 400
    APIError when it is not JSON or does not fit, and with `json_type_required` (an endpoint without keys, where a
    browser's cross-site form POST must not count as JSON) a 415 unless the Content-Type is JSON."""
    if json_type_required and not is_json_type(request.headers.get("content-type")):
        raise APIError(415, "send the body as JSON with `Content-Type: application/json`", code="invalid_content_type")
    try:
        body = json.loads(await bounded_body(request))
    except ValueError:
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    return parse_request(schema, body)


def is_json_type(content_type: str | None) -> bool:
    """`application/json` (or `application/<x>+json`), whatever its parameters."""
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def body_too_large() -> APIError:
    return APIError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes (the endpoint's cap)",
                    code="request_too_large")


async def bounded_body(request: Request) -> bytes:
    """The body, read no further than MAX_BODY_BYTES (a 413 APIError beyond, by Content-Length or by count)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise body_too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise body_too_large()
    return bytes(body)


def json_body(schema: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI `requestBody` of a route that reads `schema` itself (with `read_body`), self-contained (its
    sub-schemas inlined), so the docs and the fuzz test (tests/test_fuzz.py) know every body."""
    definitions = schema.model_json_schema()
    inline = definitions.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(inline[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(item) for item in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": resolve(definitions)}}}}


def openai_app() -> FastAPI:
    """A FastAPI application that answers every error in OpenAI's shape (never FastAPI's 422 nor an HTML page)."""
    app = FastAPI(title="LoRA Land", description="OpenAI-compatible multi-LoRA endpoint.", docs_url=None,
                  redoc_url=None, openapi_url=None)  # no Swagger page (it loads from a CDN), no schema route
    app.exception_handler(APIError)(_api_error)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(Exception)(_unexpected)
    return app


async def _api_error(request: Request, error: APIError) -> Response:
    return error.response()


async def _validation_error(request: Request, error: RequestValidationError) -> Response:
    return APIError(400, f"invalid request: {error.errors()[0].get('msg', '')}").response()


async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
    code = "not_found" if error.status_code == 404 else None
    return JSONResponse(APIError(error.status_code, str(error.detail), code=code).body(), status_code=error.status_code)


async def _unexpected(request: Request, error: Exception) -> Response:
    log.exception("unexpected error in the ingress")
    return APIError(500, f"internal error ({type(error).__name__})", type="server_error").response()


# --------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    """OpenAI's stream_options."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="`<base>`, `<base>:<task>` or `<task>` (the task's champion).")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="A 64-bit signed integer.")
    n: int = Field(default=1, description="Only 1 is served.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported; leave it 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} non-empty stop strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string may hold at most {MAX_STOP_CHARS} characters")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions."""

    prompt: str | list[str] = Field(description=f"One prompt, at most {MAX_PROMPT_CHARS} characters.")
    max_tokens: int = Field(default=16, ge=1, description="OpenAI's default: 16.")
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported")
        text = value if isinstance(value, str) else value[0]
        if not text:
            raise ValueError("the prompt is empty")
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt holds {len(text)} characters; the cap is {MAX_PROMPT_CHARS}")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("logprobs", "suffix")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value:
            raise ValueError("not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    """A text part of a message's content."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a chat request (text only)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def to_message(self) -> Message:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return Message("system" if self.role == "developer" else self.role, text)


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="Default: the rest of the context.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="OpenAI's newer name of max_tokens.")
    logprobs: bool = False
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if value[-1].role != "user":
            raise ValueError("the last message must be the user's")
        chars = sum(len(message.to_message().content) for message in value)
        if chars > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages hold {chars} characters together; the cap is {MAX_PROMPT_CHARS}")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool) -> bool:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tools are not supported")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and value.get("type") != "text":
            raise ValueError("only the text response format is supported")
        return value


# --------------------------------------------------------------------------- what the ingress asks a base-model replica


@dataclass(frozen=True)
class GenerateRequest:
    """One generation as the ingress hands it to a base model's replica (which renders and encodes it)."""

    prompt: str | None  # a completion's prompt, or None for a chat
    messages: tuple[Message, ...]  # a chat's turns, rendered with the base model's chat format
    max_tokens: int | None  # None: the rest of the context
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, stop=self.stop,
                              seed=self.seed)


def generate_request(request: CompletionRequest | ChatCompletionRequest) -> GenerateRequest:
    """The replica's view of a validated API request."""
    prompt: str | None
    messages: tuple[Message, ...]
    max_tokens: int | None
    if isinstance(request, CompletionRequest):
        prompt, messages, max_tokens = request.prompt_text(), (), request.max_tokens
    else:
        prompt, messages = None, tuple(m.to_message() for m in request.messages)
        max_tokens = request.max_completion_tokens or request.max_tokens
    return GenerateRequest(prompt, messages, max_tokens, request.temperature, request.top_p, request.stop_strings(),
                           request.seed)


# --------------------------------------------------------------------------- responses


@dataclass
class Completion:
    """What the ingress knows about one answer: ids, the model asked for, the adapter that answered."""

    chat: bool
    model: str
    adapter: str  # "" for the base model; reported as `system_fingerprint`
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "system_fingerprint": self.adapter or "base"}

    def body(self, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """A non-streaming response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        head = self._head("chat.completion" if self.chat else "text_completion")
        return head | {"choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        """A streamed piece (`text` None with a finish reason: the closing chunk)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._head("chat.completion.chunk" if self.chat else "text_completion") | {"choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage is set: no choices, the usage."""
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return head | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event (`data: ...` and a blank line)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


DONE = sse("[DONE]")


def model_card(model_id: str, owned_by: str, created: int = 0) -> dict[str, Any]:
    """One entry of GET /v1/models."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}
