"""OpenAI's Responses API, stateless (POST /v1/responses): the request body the route validates and
the response object and stream events it sends, as OpenAI documents them.

Stateless means nothing is stored: `store` must be false (OpenAI's default is true, so a client that
leaves it out gets a response that is simply not stored), and what needs a stored response or a
conversation (`previous_response_id`, `conversation`, stored `prompt`s, `background`) is refused
with a 400 that names the field, as are tools. Sampling ranges are the service's (api/sampling.py)
with OpenAI's defaults (temperature 1, top_p 1).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from api.wire.schemas import MaxTokens, ModelName, ResponseModel, Temperature, TopP
from api.wire.validation import NO_VALUE, WireModel, declares, expect

# -- the request


class InputText(WireModel):
    """A text part of an input message (`output_text` in an assistant message passed back)."""

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(WireModel):
    """A message item: OpenAI's EasyInputMessage (no `type`) or a `type: "message"` item."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"] = Field(description="developer is read as system.")
    content: Annotated[str | list[InputText], expect("a string or an array of input_text parts (only text is supported)")]


TEXT_FORMAT: dict[str, Any] = {"anyOf": [{"enum": [None, False, 0, "", [], {}]},
                                          {"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}}]}
"""`text.format` as the route takes it: left out or empty (any JSON value Python counts false), or {"type": "text"}."""


class ResponsesRequest(WireModel):
    model: ModelName | None = None
    input: Annotated[str | Annotated[list[InputMessage], Field(min_length=1)],
                     expect("a string or a non-empty array of message items with text content (other item types "
                            "are not supported)")] = Field(description="The user's text, or the conversation as message items.")
    instructions: str | None = Field(None, description="A system message put before the input.")
    max_output_tokens: MaxTokens | None = Field(None, description="Longest reply in tokens (default: DEFAULT_MAX_TOKENS).")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    stream: bool = Field(False, description="Send the reply as typed Server-Sent Events while it is generated.")
    store: Annotated[bool, declares(const=False)] = Field(
        False, description="Only false: this server stores nothing (refused when true).")
    previous_response_id: Annotated[str, declares(**NO_VALUE)] | None = Field(
        None, description="Not supported (nothing is stored): refused.")
    conversation: Annotated[str | dict[str, Any], declares(**NO_VALUE)] | None = Field(
        None, description="Not supported (nothing is stored): refused.")
    prompt: Annotated[dict[str, Any], declares(**NO_VALUE)] | None = Field(
        None, description="Stored prompt templates are not supported: refused.")
    background: Annotated[bool, declares(const=False)] = Field(
        False, description="Background mode is not supported: only false.")
    tools: Annotated[list[Any], declares(maxItems=0)] | None = Field(None, description="Not supported: refused unless empty.")
    tool_choice: Annotated[str | dict[str, Any], declares(enum=["none", "auto"])] | None = Field(
        None, description='Only "none" or "auto".')
    text: Annotated[dict[str, Any], declares(properties={"format": TEXT_FORMAT})] | None = Field(
        None, description='Only {"format": {"type": "text"}}.')
    top_logprobs: Annotated[int, declares(const=0)] | None = Field(
        None, description="Log probabilities are not supported: only 0.")
    metadata: dict[str, Any] | None = Field(None, description="Echoed in the response.")
    user: str | None = Field(None, description="Accepted and ignored.")


# -- the response object


class OutputText(ResponseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(ResponseModel):
    type: Literal["message"]
    id: str = Field(pattern=r"^msg_")
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputText]


class InputTokensDetails(ResponseModel):
    cached_tokens: int


class OutputTokensDetails(ResponseModel):
    reasoning_tokens: int


class Usage(ResponseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(ResponseModel):
    code: str
    message: str


class IncompleteDetails(ResponseModel):
    reason: Literal["max_output_tokens"]


class Response(ResponseModel):
    id: str = Field(pattern=r"^resp_")
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool
    previous_response_id: None
    store: Literal[False]
    background: Literal[False]
    temperature: float
    top_p: float
    text: dict[str, Any]
    tool_choice: str
    tools: list[Any]
    truncation: Literal["disabled"]
    usage: Usage | None = Field(description="null until the response is complete.")
    metadata: dict[str, Any]


# -- stream events (each sent as `event: <type>` with the JSON below as its data)


class ResponseEvent(ResponseModel):
    """response.created, response.in_progress, response.completed, response.incomplete, response.failed."""

    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete",
                  "response.failed"]
    sequence_number: int
    response: Response


class OutputItemEvent(ResponseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputMessage


class ContentPartEvent(ResponseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(ResponseModel):
    type: Literal["response.output_text.delta"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any]


class TextDoneEvent(ResponseModel):
    type: Literal["response.output_text.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any]


class ErrorEvent(ResponseModel):
    """An error after the stream began (the generation ran over its time, say); response.failed follows."""

    type: Literal["error"]
    sequence_number: int
    code: str | None
    message: str
    param: str | None


StreamEvent = ResponseEvent | OutputItemEvent | ContentPartEvent | TextDeltaEvent | TextDoneEvent | ErrorEvent
