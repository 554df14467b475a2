"""Anthropic's Messages API (POST /v1/messages, POST /v1/messages/count_tokens): the request bodies
the routes validate and the responses and stream events they send, as Anthropic documents them.

Sampling ranges are the service's (api/sampling.py), with Anthropic's defaults: temperature 1, and
top_p and top_k off unless given. Fields this server cannot honour (tools, extended thinking,
structured output) are declared so that a request using them gets a 400 naming them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from api.wire.schemas import MAX_STOPS, MaxTokens, ModelName, ResponseModel, Temperature, TopK, TopP
from api.wire.validation import NULL, WireModel, declares, expect

# -- requests


class TextBlock(WireModel):
    """A text content block; `cache_control` and `citations` are accepted and ignored."""

    type: Literal["text"]
    text: str


TextContent = Annotated[str | list[TextBlock], expect("a string or an array of text blocks (only text is supported)")]


class Message(WireModel):
    role: Literal["user", "assistant"]
    content: TextContent = Field(description="A string, or an array of text blocks (images, documents and tool "
                                             "blocks are not supported).")


def _typed(*types: str) -> dict[str, Any]:
    """JSON Schema: an object whose `type` is one of `types`."""
    return {"required": ["type"], "properties": {"type": {"enum": list(types)}}}


class Unsupported(WireModel):
    """Fields of the Messages API this server cannot honour: refused with a 400 that names them."""

    tools: Annotated[list[Any], declares(maxItems=0)] | None = Field(None, description="Not supported: refused unless empty.")
    mcp_servers: Annotated[list[Any], declares(maxItems=0)] | None = Field(
        None, description="Not supported: refused unless empty.")
    tool_choice: Annotated[dict[str, Any], declares(**_typed("auto", "none"))] | None = Field(
        None, description='Only {"type": "auto"} or {"type": "none"}.')
    thinking: Annotated[dict[str, Any], declares(**_typed("disabled"))] | None = Field(
        None, description='Extended thinking is not supported: only {"type": "disabled"}.')
    output_config: Annotated[dict[str, Any], declares(properties={"format": NULL})] | None = Field(
        None, description="A `format` (structured output) is not supported.")


class CountTokensRequest(Unsupported):
    """POST /v1/messages/count_tokens: what the prompt of these messages costs, in tokens."""

    model: ModelName | None = None
    messages: list[Message] = Field(min_length=1, description="The conversation so far, oldest first; it must end with a "
                                                              "user message.")
    system: TextContent | None = Field(None, description="The system prompt: a string or an array of text blocks.")


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    max_tokens: MaxTokens = Field(description="Longest reply, in tokens (required, as in Anthropic's API).")
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOPS)] | None = Field(
        None, description="Text that ends the reply (not included in it); the one met is reported in `stop_sequence`.")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    stream: bool = Field(False, description="Send the reply as Server-Sent Events while it is generated.")
    metadata: dict[str, Any] | None = Field(None, description="Accepted and ignored.")
    service_tier: str | None = Field(None, description="Accepted and ignored.")


# -- responses


class TextBlockOut(ResponseModel):
    type: Literal["text"]
    text: str


StopReason = Literal["end_turn", "max_tokens", "stop_sequence"]


class Usage(ResponseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = Field(0, description="Always 0: there is no prompt cache.")
    cache_read_input_tokens: int = Field(0, description="Always 0: there is no prompt cache.")


class MessageReply(ResponseModel):
    id: str = Field(pattern=r"^msg_")
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[TextBlockOut]
    stop_reason: StopReason | None = Field(description="null only in a stream's message_start.")
    stop_sequence: str | None = Field(description="The stop sequence that ended the reply, if one did.")
    usage: Usage


class TokenCount(ResponseModel):
    input_tokens: int = Field(description="The tokens of the prompt these messages make, as /v1/messages would count them.")


class ErrorObject(ResponseModel):
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, not_found_error, "
                                  "request_too_large, api_error, overloaded_error or timeout_error.")
    message: str


class ErrorResponse(ResponseModel):
    """Every 4xx/5xx of these routes, and a stream's `error` event."""

    type: Literal["error"]
    error: ErrorObject


# -- stream events (each sent as `event: <type>` with the JSON below as its data)


class MessageStartEvent(ResponseModel):
    type: Literal["message_start"]
    message: MessageReply


class ContentBlockStartEvent(ResponseModel):
    type: Literal["content_block_start"]
    index: int
    content_block: TextBlockOut


class PingEvent(ResponseModel):
    type: Literal["ping"]


class TextDelta(ResponseModel):
    type: Literal["text_delta"]
    text: str


class ContentBlockDeltaEvent(ResponseModel):
    type: Literal["content_block_delta"]
    index: int
    delta: TextDelta


class ContentBlockStopEvent(ResponseModel):
    type: Literal["content_block_stop"]
    index: int


class MessageDelta(ResponseModel):
    stop_reason: StopReason
    stop_sequence: str | None


class DeltaUsage(ResponseModel):
    input_tokens: int
    output_tokens: int


class MessageDeltaEvent(ResponseModel):
    type: Literal["message_delta"]
    delta: MessageDelta
    usage: DeltaUsage


class MessageStopEvent(ResponseModel):
    type: Literal["message_stop"]


StreamEvent = (MessageStartEvent | ContentBlockStartEvent | PingEvent | ContentBlockDeltaEvent | ContentBlockStopEvent
               | MessageDeltaEvent | MessageStopEvent | ErrorResponse)
