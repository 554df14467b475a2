"""The Ollama API's request and response bodies (api/wire/ollama.py), field by field after Ollama's
API documentation (docs/api.md) and the models of the official `ollama` Python client
(ollama/_types.py), which define what clients send and what they parse.

Requests keep Ollama's defaults (temperature 0.8, top_p 0.9, repeat_penalty 1.1, ...). Fields we
cannot honour are declared so that a value which would change the answer gets a 400 naming them;
the empty or false value a client sends by default is accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, Field

from api.wire.schemas import MAX_EMBEDDING_INPUTS, MinP, RepeatPenalty, ResponseModel, Stop, Temperature, TopK, TopP
from api.wire.validation import NonBlank, WireModel, declares, expect

OllamaModelName = Annotated[NonBlank, Field(
    description="An installed model: its name as /api/tags lists it (`name:latest`), or without the tag, or its .gguf "
                "file name. Another installed model is loaded on demand; one that is not installed is a 404.")]
KeepAlive = Annotated[str | float, expect("a duration string such as \"5m\" or a number of seconds"), Field(
    description="Accepted: a worker keeps its model for its whole life (and is replaced after RESTART_AFTER_REQUESTS).")]


# -- requests


class OllamaOptions(WireModel):
    """Ollama's model options: these are honoured; any other option is accepted and ignored, as Ollama does."""

    temperature: Temperature = 0.8
    top_k: TopK = 40
    top_p: TopP = 0.9
    min_p: MinP = 0.0
    repeat_penalty: RepeatPenalty = 1.1
    repeat_last_n: int = Field(64, ge=-1, description="How many recent tokens the repeat penalty looks at (0: off, "
                                                       "-1: the whole context window).")
    num_predict: int = Field(-1, ge=-2, description="Longest reply in tokens; -1, -2 and 0 mean no limit of the "
                                                    "request's own (the server's DEFAULT_MAX_TOKENS applies).")
    stop: Stop | None = None
    num_ctx: int | None = Field(None, ge=1, description="Accepted up to the model's context window (the smaller of "
                                                        "N_CTX and what the model was trained for; /api/show reports it).")
    seed: int | None = Field(None, description="Accepted, but gpt4all seeds its sampler from the clock and cannot honour it.")


Format = Annotated[str | dict[str, Any], expect('"json", a JSON schema or ""')]
Nothing = declares(maxItems=0)
"""An unsupported list: only empty (or null) is accepted."""


class OllamaGeneration(WireModel):
    """Fields shared by /api/chat and /api/generate."""

    model: OllamaModelName
    stream: bool = Field(True, description="Stream the reply as newline-delimited JSON (the default); false: one object.")
    options: OllamaOptions | None = None
    keep_alive: KeepAlive | None = None
    format: Annotated[Format, declares(enum=["", {}])] | None = Field(
        None, description='Not supported: only "" (no format) is accepted.')
    think: Annotated[bool | str, expect("a boolean or a string"), declares(enum=[False, ""])] | None = Field(
        None, description="Not supported: only false (the model does not think).")
    logprobs: Annotated[bool, declares(const=False)] | None = Field(None, description="Not supported: only false.")
    top_logprobs: Annotated[int, declares(const=0)] | None = Field(None, ge=0, description="Not supported: only 0.")


class OllamaMessage(WireModel):
    role: Literal["system", "user", "assistant"] = Field(description="tool messages are refused (no tool calling).")
    content: str = ""
    images: Annotated[list[Any], Nothing] | None = Field(None, description="Not supported (text models only): refused "
                                                                           "unless empty.")
    tool_calls: Annotated[list[Any], Nothing] | None = Field(None, description="Not supported: refused unless empty.")
    thinking: str | None = Field(None, description="Accepted and ignored.")


class OllamaChatRequest(OllamaGeneration):
    messages: list[OllamaMessage] = Field(
        default_factory=list, description="The conversation so far, oldest first. Empty: only check that the model is "
                                          "there (`done_reason` load, or unload with keep_alive 0).")
    tools: Annotated[list[Any], Nothing] | None = Field(None, description="Not supported: refused unless empty.")


class OllamaGenerateRequest(OllamaGeneration):
    prompt: str = Field("", description="The prompt. Empty: only check that the model is there (`done_reason` load).")
    system: str | None = Field(None, description="A system message put before the prompt (through the chat template).")
    raw: bool = Field(False, description="true: the prompt goes to the model as it is, without the chat template.")
    suffix: Annotated[str, declares(maxLength=0)] | None = Field(
        None, description="Not supported (insertion): refused unless empty.")
    template: Annotated[str, declares(maxLength=0)] | None = Field(
        None, description="Not supported (Ollama's Go templates): refused unless empty; the model's own chat template "
                          "is used.")
    context: Annotated[list[int], Nothing] | None = Field(
        None, description="Not supported (this server returns no context): refused unless empty.")
    images: Annotated[list[Any], Nothing] | None = Field(None, description="Not supported (text models only): refused "
                                                                           "unless empty.")

    document_rules: ClassVar[dict[str, Any]] = {  # a raw prompt goes to the model as it is: no system message
        "not": {"required": ["raw", "system"], "properties": {"raw": {"const": True}, "system": {"type": "string", "minLength": 1}}}}


class OllamaEmbedRequest(WireModel):
    model: OllamaModelName
    input: Annotated[str | Annotated[list[Annotated[str, declares(minLength=1)]], Field(max_length=MAX_EMBEDDING_INPUTS)],
                     expect("a string or an array of strings")] = Field(
        "", description="A text or a list of texts. Empty: only check that the model is there.")
    truncate: bool = Field(True, description="Accepted: a long text is embedded whole (in windows that are averaged), "
                                             "never cut or refused.")
    dimensions: int | None = Field(None, ge=0, description="Must equal the model's dimension if given (vectors cannot be "
                                                           "shortened); 0 means the model's own, as in Ollama.")
    options: dict[str, Any] | None = Field(None, description="Accepted and ignored (embeddings take no sampling).")
    keep_alive: KeepAlive | None = None


class OllamaEmbeddingsRequest(WireModel):
    model: OllamaModelName
    prompt: str = Field("", description="The text. Empty: an empty embedding, as Ollama answers.")
    options: dict[str, Any] | None = Field(None, description="Accepted and ignored (embeddings take no sampling).")
    keep_alive: KeepAlive | None = None


class OllamaShowRequest(WireModel):
    model: OllamaModelName = Field(validation_alias=AliasChoices("model", "name"))
    verbose: bool = Field(False, description="Also the large arrays of model_info (the tokenizer's tokens and merges).")


# -- responses


class OllamaError(ResponseModel):
    """Every 4xx/5xx of the Ollama routes, and an error inside a stream (as its last line)."""

    error: str = Field(description="What went wrong, for a person to read.")


class OllamaVersion(ResponseModel):
    version: str = Field(description="The version of Ollama's API this server follows.")


class OllamaModelDetails(ResponseModel):
    parent_model: str
    format: Literal["gguf"]
    family: str = Field(description="general.architecture of the GGUF header.")
    families: list[str]
    parameter_size: str = Field(description='e.g. "134.52M" (general.parameter_count, or counted from the tensors).')
    quantization_level: str = Field(description='e.g. "Q4_1" (general.file_type).')


class OllamaModel(ResponseModel):
    name: str = Field(description="`<file name without .gguf>:latest`.")
    model: str
    modified_at: str = Field(description="The file's modification time (RFC 3339).")
    size: int = Field(description="The file's size in bytes.")
    digest: str = Field(description="SHA-256 of the file's name, size and modification time (it changes whenever the "
                                    "file does), not of its content.")
    details: OllamaModelDetails


class OllamaTags(ResponseModel):
    models: list[OllamaModel]


class OllamaRunningModel(OllamaModel):
    expires_at: str = Field(description="A worker holds its models until it is replaced, not on a timer: far in the future.")
    size_vram: int = Field(description="0 on the CPU.")
    context_length: int = Field(description="The context window the model is loaded with.")


class OllamaRunning(ResponseModel):
    models: list[OllamaRunningModel] = Field(description="The models this worker has loaded.")


class OllamaShow(ResponseModel):
    modelfile: str
    parameters: str = Field(description="num_ctx (the context window) and stop (the end-of-turn token), one per line.")
    template: str = Field(description="The model's chat template (Jinja, from the GGUF metadata).")
    details: OllamaModelDetails
    model_info: dict[str, Any] = Field(description="The GGUF metadata; its arrays are empty unless verbose.")
    capabilities: list[Literal["completion", "embedding"]]
    modified_at: str
    license: str | None = None


class OllamaReplyMessage(ResponseModel):
    role: Literal["assistant"]
    content: str


class OllamaStats(ResponseModel):
    """Only in the last object (done: true) of a generation. Durations in nanoseconds, measured."""

    done_reason: Literal["stop", "length", "load", "unload"] | None = None
    total_duration: int | None = Field(None, description="From the request's arrival to its last token.")
    load_duration: int | None = Field(None, description="From the request's arrival to the start of generation (the "
                                                        "model is already loaded: a worker loads it before it takes a request).")
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OllamaChatResponse(OllamaStats):
    """A whole reply (stream: false) or one line of a stream: done false with a piece of the reply, then done true."""

    model: str = Field(description="The model as the request named it.")
    created_at: str
    message: OllamaReplyMessage
    done: bool


class OllamaGenerateResponse(OllamaStats):
    """A whole reply (stream: false) or one line of a stream: done false with a piece of the reply, then done true."""

    model: str = Field(description="The model as the request named it.")
    created_at: str
    response: str
    done: bool


class OllamaEmbedResponse(ResponseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class OllamaEmbeddingsResponse(ResponseModel):
    embedding: list[float]
