"""The wire contract: every request body the routes validate and every response they send.

Request models (`WireModel`) are what the routes parse with (api.wire.validation.parse); response
models describe what the adapters send. api/openapi.py turns both into the OpenAPI document, and
the contract tests check real responses against it, so this file is the single written-down form
of the interface.

The sampling ranges come from api/sampling.py, which the generation service's guard also reads, so
that clients see them in the document and get a 400 naming their own field.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.model_names import REQUESTED_MODEL_FILE_SCHEMA
from api.sampling import BOUNDS
from api.wire.validation import NOT_NULL, WHITESPACE, NonBlank, WireModel, declares, expect

MAX_CHOICES = 8
MAX_COMPLETION_CHOICES = 32
"""The most choices one /v1/completions request may ask for: its prompts times `n`."""
FEWER_PROMPTS_FROM_N = ((2, 16), (3, 8), (5, 4))
"""From each `n` up, at most that many prompts: 32 with n=1, 16 with n=2, 8 with n up to 4, 4 with n
up to 8, so that prompts x n stays within MAX_COMPLETION_CHOICES. Steps rather than 32 // n: the
document states each step as a rule, and the fuzzer's schema engine models no more than a few."""


def max_prompts(n: int) -> int:
    """The most prompts one /v1/completions request with this `n` may send."""
    return min([MAX_COMPLETION_CHOICES, *(prompts for from_n, prompts in FEWER_PROMPTS_FROM_N if n >= from_n)])
MAX_STOPS = 16
MAX_EMBEDDING_INPUTS = 2048

# -- gpt4all's own GPT4All.generate() defaults (gpt4all 2.8.2), for the routes that speak its names:
# the original route and /v0. tests/test_route_defaults.py checks them against the installed bindings.

GPT4ALL_TEMP = 0.7
GPT4ALL_TOP_P = 0.4
GPT4ALL_TOP_K = 40
GPT4ALL_MIN_P = 0.0
GPT4ALL_REPEAT_PENALTY = 1.18  # without it greedy replies of small models loop
GPT4ALL_REPEAT_LAST_N = 64

# -- sampling values shared by the wire formats (the service's ranges)

Temperature = BOUNDS["temperature"].annotated()
TopP = BOUNDS["top_p"].annotated()
TopK = BOUNDS["top_k"].annotated()
MinP = BOUNDS["min_p"].annotated()
RepeatPenalty = BOUNDS["repeat_penalty"].annotated()
RepeatLastN = BOUNDS["repeat_last_n"].annotated()
MaxTokens = BOUNDS["max_tokens"].annotated()
ModelName = Annotated[str, Field(description="An installed model: its id or .gguf file name. Default: MODEL_NAME. Another installed "
                                             "model is loaded on demand; a model that is not installed is a 404 (retrieve it first).")]
StopList = Annotated[list[str], Field(max_length=MAX_STOPS)]
Stop = Annotated[str | StopList, expect(f"a string or a list of at most {MAX_STOPS} strings"),
                 Field(description="Text that ends the reply (not included in it): a string or a list of strings.")]
NonEmptyText = Annotated[str, Field(min_length=1)]

NOTHING: dict[str, Any] = {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "object", "maxProperties": 0}]}
"""The schema of a field accepted only when it asks for nothing: [] or {} (or null)."""
NO_TOOL_USE: tuple[object, ...] = (None, [], {}, "none", "auto")
"""The values of tools, functions, tool_choice and function_call that ask for no tool call: with no
tools given, "auto" can only mean none (as OpenAI reads it)."""
NO_TOOL_CHOICE: dict[str, Any] = {"anyOf": [*NOTHING["anyOf"], {"enum": ["none", "auto"]}]}
Fingerprint = Annotated[str, Field(pattern=r"^fp_[0-9a-f]{10}$", description=(
    "Identifies the loaded model file (from its name, size and header): it changes when the file does."))]


def _given(*names: str, **schemas: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema: each of `names` is given (present and not null), and matches its schema if one is named.
    (Both as subschemas: a schema that says `not` itself must not replace the `not` of NOT_NULL.)"""
    return {"required": list(names),
            "properties": {name: {"allOf": [NOT_NULL, schemas[name]]} if name in schemas else NOT_NULL for name in names}}


PROMPT_TEMPLATE_PATTERN = f"^(?:[^%]|%+[^%12])*%*%1(?:[^%]|%+[^%12])*%*(?:%2[{WHITESPACE}]*)?$"
"""GPT4All's prompt template: %1 (the prompt) exactly once, and at most one %2 (the reply), with
nothing but white space after it. (`%+[^%12]` is a run of % that starts neither marker.)"""


class ResponseModel(BaseModel):
    """Base of the documented responses: extra fields may be added in later versions."""

    model_config = ConfigDict(extra="allow")


# -- errors (every wire format)


class ErrorDetail(ResponseModel):
    message: str = Field(description="What went wrong, for a person to read.")
    type: str = Field(description="invalid_request_error, authentication_error, permission_error or server_error.")
    param: str | None = Field(description="The request field at fault, as the client named it (e.g. messages[0].role).")
    code: str | None = Field(description="A stable machine-readable code, e.g. model_not_found, download_disabled.")


class ErrorResponse(ResponseModel):
    """Every 4xx/5xx: OpenAI's error object (SDKs parse it; 4xx for bad input, they retry 5xx)."""

    error: ErrorDetail


# -- the original route: POST {ROUTE}


class OriginalRequest(WireModel):
    """The original contract: a prompt and a persona (the system prompt)."""

    prompt: NonBlank = Field(description="The user's message.")
    persona: str | None = Field(None, description="The system prompt.")
    assist: str | None = Field(None, description="An earlier assistant message, put before the prompt.")
    temp: Temperature = GPT4ALL_TEMP
    max_tokens: MaxTokens | None = Field(None, description="Longest reply in tokens (default: DEFAULT_MAX_TOKENS).")
    top_p: TopP = GPT4ALL_TOP_P
    top_k: TopK = GPT4ALL_TOP_K
    repeat_penalty: RepeatPenalty = GPT4ALL_REPEAT_PENALTY
    repeat_last_n: RepeatLastN = GPT4ALL_REPEAT_LAST_N
    stream: bool | None = Field(None, description="Stream the reply as plain text while it is generated (default: STREAM).")


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(ResponseModel):
    prompt_seconds: float
    total_seconds: float
    tokens_per_second: float


class OriginalReply(ResponseModel):
    """The reply as JSON, for a client that sends `Accept: application/json`."""

    reply: str
    model: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    timings: Timings


class DeepCheck(ResponseModel):
    seconds: float = Field(description="How long the one-token generation took, waiting for a slot included.")
    tokens: int = Field(description="Tokens generated (1, or 0 if the model stopped at once).")


class Health(ResponseModel):
    status: Literal["loading", "ready", "failed"]
    model: str = Field(description="The chat model file this worker serves.")
    reason: str | None = Field(None, description="Why loading (or the deep check) failed.")
    deep: DeepCheck | None = Field(None, description="With `?deep=1`: the one-token generation that was run.")


class Readiness(ResponseModel):
    status: Literal["ready", "unavailable"]
    reason: str | None = Field(None, description="Why a request sent now would not be served.")
    waiting: int | None = Field(None, description="Requests waiting for an inference slot.")


# -- OpenAI-compatible /v1


class StreamOptions(WireModel):
    include_usage: bool = Field(False, description="Send a last chunk with the token usage and no choices.")


class OpenAISampling(WireModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: ModelName | None = None
    max_tokens: MaxTokens | None = Field(None, description="Longest reply in tokens (default: DEFAULT_MAX_TOKENS).")
    max_completion_tokens: MaxTokens | None = Field(None, description="Same as max_tokens; wins when both are set.")
    temperature: Temperature = 0.7
    top_p: TopP = 1.0
    top_k: TopK = 40
    min_p: MinP = 0.0
    presence_penalty: float = Field(0.0, ge=0, le=2, description="Mapped to repeat_penalty = 1 + presence_penalty / 2. "
                                                               "Not together with repeat_penalty unless 0.")
    frequency_penalty: Annotated[float, declares(const=0)] = Field(
        0.0, description="Only 0 is supported (gpt4all has no count-based penalty).")
    repeat_penalty: RepeatPenalty | None = None
    repeat_penality: RepeatPenalty | None = Field(
        None, description="The old misspelling of repeat_penalty, still accepted (not together with repeat_penalty).")
    repeat_last_n: RepeatLastN = 64
    seed: int | None = Field(None, description="Accepted, but gpt4all seeds its sampler from the clock and cannot honour it.")
    stop: Stop | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="How many replies to generate, one after the other.")
    stream: bool = Field(False, description="Send the reply as Server-Sent Events while it is generated.")
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true.")
    user: str | None = Field(None, description="Accepted and ignored.")
    logprobs: Annotated[bool | int, expect("a boolean or an integer"), declares(enum=[False, 0])] | None = Field(
        None, description="Not supported: only false/0.")
    response_format: Annotated[dict[str, Any], declares(
        anyOf=[{"maxProperties": 0}, {"required": ["type"], "properties": {"type": {"const": "text"}}}])] | None = Field(
        None, description='Only {"type": "text"}.')
    tools: Annotated[list[Any], declares(maxItems=0)] | None = Field(None, description="Not supported: refused unless empty.")
    tool_choice: Annotated[Any, declares(**NO_TOOL_CHOICE)] = Field(
        None, description='Only "none" or "auto" (with no tools, both mean no tool call), or empty.')
    functions: Annotated[list[Any], declares(maxItems=0)] | None = Field(None, description="Not supported: refused unless empty.")
    function_call: Annotated[Any, declares(**NO_TOOL_CHOICE)] = Field(
        None, description='Only "none" or "auto" (with no functions, both mean no call), or empty.')

    document_rules: ClassVar[dict[str, Any]] = {"allOf": [
        {"not": _given("repeat_penalty", "repeat_penality")},
        {"not": _given("repeat_penalty", "presence_penalty", presence_penalty={"not": {"const": 0}})},
        {"not": _given("repeat_penality", "presence_penalty", presence_penalty={"not": {"const": 0}})},
        {"not": {"required": ["stream_options"], "properties": {"stream_options": NOT_NULL, "stream": {"not": {"const": True}}}}},
    ]}


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="developer is read as system.")
    content: Annotated[str | list[TextPart], expect("a string or an array of text parts")] | None = Field(
        None, description="The text, or an array of text parts. May be left out only for an assistant message.")
    name: str | None = Field(None, description="Accepted and ignored.")

    document_rules: ClassVar[dict[str, Any]] = {
        "if": {"properties": {"role": {"const": "assistant"}}}, "else": _given("content")}


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far, oldest first.")


class CompletionRequest(OpenAISampling):
    prompt: Annotated[NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_COMPLETION_CHOICES)],
                      expect(f"a non-empty string or a list of 1 to {MAX_COMPLETION_CHOICES} non-empty strings (token "
                             "arrays are not supported)")] = Field(
        description=f"The text to continue, or a list of texts (a batch): each is generated `n` times, and the choices "
                    f"are numbered prompt by prompt (prompt i's j-th reply is choice i*n+j). At most "
                    f"{MAX_COMPLETION_CHOICES} prompts with n=1, 16 with n=2, 8 with n up to 4, 4 with n up to 8.")
    echo: bool = Field(False, description="Put the prompt in front of the reply.")
    suffix: Annotated[str, declares(maxLength=0)] | None = Field(None, description="Not supported (insertion): empty or null.")
    prompt_template: Annotated[str, declares(pattern=PROMPT_TEMPLATE_PATTERN)] | None = Field(
        None, description="Wraps the prompt before generation: %1 stands for the prompt (exactly once). A %2, if present, marks "
                          "where the reply goes and must be at the end.")
    prompt_batch_size: int | None = Field(None, ge=1, description="Accepted; prompts are always processed in batches of 128 tokens.")
    reload: bool = Field(False, description="Accepted: every request already gets a fresh context.")
    thread_count: int | None = Field(None, ge=0, description="Accepted and ignored (threads are set by N_THREADS).")

    document_rules: ClassVar[dict[str, Any]] = {"allOf": [
        *OpenAISampling.document_rules["allOf"],
        # no more prompts than max_prompts(n)
        *({"not": _given("n", "prompt", n={"minimum": from_n}, prompt={"type": "array", "minItems": prompts + 1})}
          for from_n, prompts in FEWER_PROMPTS_FROM_N),
    ]}


class ChatReplyMessage(ResponseModel):
    role: Literal["assistant"]
    content: str
    refusal: None = None


class ChatChoice(ResponseModel):
    index: int
    message: ChatReplyMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(ResponseModel):
    id: str = Field(pattern=r"^chatcmpl-")
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Fingerprint


class ChunkDelta(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(ResponseModel):
    index: int
    delta: ChunkDelta
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(ResponseModel):
    """One Server-Sent Event of a streamed chat completion (the stream ends with `data: [DONE]`)."""

    id: str = Field(pattern=r"^chatcmpl-")
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: Fingerprint
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, description="null in every chunk but the last when stream_options.include_usage.")


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class Completion(ResponseModel):
    id: str = Field(pattern=r"^cmpl-")
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: Fingerprint


class ModelObject(ResponseModel):
    id: str = Field(description="The model's file name without .gguf.")
    object: Literal["model"]
    created: int
    owned_by: str
    data: str | None = Field(None, description="What retrieving it did (as GPT4ALL-Python-API reported it).")


class ModelList(ResponseModel):
    object: Literal["list"]
    data: list[ModelObject]


class Engine(ResponseModel):
    id: str
    object: Literal["engine"]
    created: int | None
    owner: str
    ready: bool


class EngineList(ResponseModel):
    object: Literal["list"]
    data: list[Engine]


class HealthStatus(ResponseModel):
    status: Literal["ok", "loading", "failed"]


class EmbeddingRequest(WireModel):
    input: Annotated[NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)],
                     expect(f"a non-empty string or an array of 1 to {MAX_EMBEDDING_INPUTS} non-empty strings (token arrays "
                            "are not supported)")] = Field(
        description="A text or a list of texts.")
    model: ModelName | None = Field(None, description="The embedding model (default: EMBEDDING_MODEL_NAME).")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 values.")
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's dimension if given (vectors cannot be "
                                                               "shortened): a 400 otherwise.")
    user: str | None = None


class EmbeddingData(ResponseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingUsage(ResponseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(ResponseModel):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# -- the Flask /v0 server (llm-api-docker)


class V0Sampling(WireModel):
    """gpt4all's own generate() parameters, all optional."""

    model: ModelName | None = None
    max_tokens: MaxTokens | None = Field(None, description="Longest reply in tokens (default: DEFAULT_MAX_TOKENS).")
    temp: Temperature = GPT4ALL_TEMP
    top_k: TopK = GPT4ALL_TOP_K
    top_p: TopP = GPT4ALL_TOP_P
    min_p: MinP = GPT4ALL_MIN_P
    repeat_penalty: RepeatPenalty = GPT4ALL_REPEAT_PENALTY
    repeat_last_n: RepeatLastN = GPT4ALL_REPEAT_LAST_N


class V0Message(WireModel):
    role: Literal["system", "user", "assistant"]
    content: str


class V0ChatRequest(V0Sampling):
    messages: list[V0Message] = Field(min_length=1, description="The conversation so far, oldest first.")


class V0GenerateRequest(V0Sampling):
    prompt: NonBlank = Field(description="Raw text passed to the model as it is (no chat template).")


class V0RetrieveRequest(WireModel):
    model_name: Annotated[str, declares(**REQUESTED_MODEL_FILE_SCHEMA)] = Field(
        description="A bare .gguf file name (the .gguf may be left out).")
    model_path: str | None = Field(None, description="MODEL_PATH (the default) or a folder inside it; nothing else.")
    allow_download: bool = Field(True, description="false: only report whether the model is installed.")


class V0Reply(ResponseModel):
    role: Literal["assistant"]
    content: str


class V0ChatReply(ResponseModel):
    id: str = Field(pattern=r"^chat-completions-[0-9]+\.[0-9]+$")
    replies: list[V0Reply]


class V0GenerateReply(ResponseModel):
    id: str = Field(pattern=r"^generate-[0-9]+\.[0-9]+$")
    text: str


class V0RetrieveReply(ResponseModel):
    success: bool
    message: str


class V0RetrieveError(ErrorResponse):
    """A failed retrieval: the /v0 fields beside the usual error object (not on a 401 or 403 from the
    access checks, which answer before the route)."""

    success: Literal[False] = False
    message: str | None = None


class V0ModelList(ResponseModel):
    models: list[str] = Field(description="The installed model files.")


# -- the generic LLM API (llm-api): /generate, /agenerate, /embeddings, /check


class LlmParams(WireModel):
    """The sampling parameters of llm-api; unknown ones are ignored."""

    n_predict: MaxTokens | None = Field(None, description="Longest reply in tokens (default: DEFAULT_MAX_TOKENS).")
    temp: Temperature = 0.1
    top_k: TopK = 40
    top_p: TopP = 0.95
    min_p: MinP = 0.0
    stop: Stop | None = None
    repeat_penalty: RepeatPenalty = 1.3
    repeat_last_n: RepeatLastN = 64


class LlmGenerateRequest(WireModel):
    prompt: str = Field(min_length=1, description="Raw text passed to the model as it is (no chat template).")
    params: LlmParams | None = None
    model: ModelName | None = None


class LlmEmbeddingsRequest(WireModel):
    text: str = Field(min_length=1)
