"""The OpenAI embeddings wire format: the request, the answer and the error shape.

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}`` so that
any OpenAI client (and :class:`~app.core.embedding.OpenAIEmbedder`) reads them.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/embeddings``; ``user`` and unknown fields are ignored, as OpenAI does."""

    input: str | list[str]
    model: str
    encoding_format: Literal["float"] = "float"
    dimensions: int | None = None
    user: str | None = None


class Embedding(msgspec.Struct, kw_only=True):
    object: str = "embedding"
    index: int
    embedding: list[float]


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ApiError(Exception):
    """A refusal with its HTTP status, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_
        self.param = param
        self.retry_after = retry_after

    def body(self) -> bytes:
        return msgspec.json.encode(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )
