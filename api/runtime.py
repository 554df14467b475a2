"""What a worker holds while it runs: its settings, its loaded models and the generation service.

The Flask app is built around a Runtime before the models are loaded, so `/health` can answer
503 while loading and 200 once ready.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from api.config import Settings
from api.errors import ModelLoadFailed, ModelNotFound, ServiceUnavailable
from api.generation import GenerationService, InferenceObserver, Limits
from api.inference import ChatEngine, EmbeddingEngine, ModelLoadError
from api.inference_slots import InferenceSlots
from api.model_names import InstalledModel, ModelNameError, file_name_for, installed_models, model_id
from api.sampler_seed import claim_slot

log = logging.getLogger("api.runtime")


class RuntimeState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class EngineLoader(Protocol):
    """Opens model files as engines. Raises ModelLoadError for a file the engine cannot use."""

    def chat(self, path: Path, settings: Settings, *, default: bool) -> ChatEngine:
        """`default`: the worker's own model, loaded at start (its sampler gets the worker's seed)."""
        ...

    def embedding(self, path: Path, settings: Settings) -> EmbeddingEngine: ...


class GPT4AllLoader:
    """The real engine (api/engine.py), imported on the first load: importing api must not import gpt4all."""

    def chat(self, path: Path, settings: Settings, *, default: bool) -> ChatEngine:
        from api.engine import ChatModel

        chat = ChatModel(path, n_ctx=settings.n_ctx, n_threads=settings.threads_per_worker, device=settings.device)
        if default:
            chat.advance_sampler(claim_slot(settings.run_dir, *chat.loaded_between))
        return chat

    def embedding(self, path: Path, settings: Settings) -> EmbeddingEngine:
        from api.engine import EmbeddingModel

        return EmbeddingModel(path, n_threads=settings.threads_per_worker, device=settings.device)


class ModelHost:
    """The loaded models of this worker, and the installed ones it may load on demand."""

    def __init__(self, settings: Settings, loader: EngineLoader | None = None) -> None:
        self.settings = settings
        self.loader = loader or GPT4AllLoader()
        self._chat: dict[str, ChatEngine] = {}
        self._embedding: EmbeddingEngine | None = None
        self._load_lock = threading.Lock()
        self.failure: str | None = None  # why the default model could not be loaded, if it could not

    # -- loading

    def load_default_models(self) -> None:
        settings = self.settings
        chat = self.loader.chat(settings.chat_model_file, settings, default=True)
        self._chat[chat.name] = chat
        if settings.embedding_model_file.is_file():
            self._embedding = self.loader.embedding(settings.embedding_model_file, settings)
        else:
            log.warning("embedding model %s not found in %s: /v1/embeddings is off",
                        settings.embedding_model_name, settings.model_path)

    # -- lookup

    def installed(self) -> list[InstalledModel]:
        return installed_models(self.settings.model_path)

    def available_ids(self) -> list[str]:
        return [model.id for model in self.installed()]

    def loaded_files(self) -> list[str]:
        """The model files this worker holds in memory: its chat models, then its embedding model."""
        return [*self._chat, *([self.settings.embedding_model_name] if self._embedding is not None else [])]

    def _not_found(self, requested: str) -> ModelNotFound:
        available = ", ".join(self.available_ids()) or "none"
        return ModelNotFound(f"The model '{requested}' does not exist. Available models: {available}", param="model")

    def _file_name(self, requested: str) -> str:
        try:
            return file_name_for(requested)
        except ModelNameError:
            raise self._not_found(requested) from None

    def chat_model(self, requested: str | None) -> ChatEngine:
        default = self._chat.get(self.settings.model_name)
        if default is None and self.failure:
            raise ServiceUnavailable(f"the model could not be loaded: {self.failure}", retry_after=30,
                                     code="model_load_failed")
        if default is None:
            raise ServiceUnavailable("the model is still loading; try again shortly", retry_after=1)
        if not requested or requested in (self.settings.model_name, model_id(self.settings.model_name)):
            return default
        name = self._file_name(requested)
        if name in self._chat:
            return self._chat[name]
        return self._load_chat_on_demand(name, requested)

    def _load_chat_on_demand(self, name: str, requested: str) -> ChatEngine:
        path = self.settings.model_path / name
        described = next((model for model in self.installed() if model.file_name == name), None)
        if described is None:
            raise self._not_found(requested)
        if described.is_embedding:  # a 404 (as OpenAI answers): which kind a name is depends on the files
            raise ModelNotFound(f"'{requested}' is an embedding model, not a chat model; use /v1/embeddings",
                                param="model", code="not_a_chat_model")
        with self._load_lock:
            if name not in self._chat:
                log.info("loading model %s on demand", name)
                try:
                    self._chat[name] = self.loader.chat(path, self.settings, default=False)
                except ModelLoadError as error:
                    raise ModelLoadFailed(f"the model '{requested}' could not be loaded: {error}", param="model") from None
        return self._chat[name]

    def embedding_model(self, requested: str | None) -> EmbeddingEngine:
        if self._embedding is None:
            raise ServiceUnavailable("no embedding model is installed (EMBEDDING_MODEL_NAME)", retry_after=60,
                                     code="embedding_model_missing")
        if requested and requested not in (self.settings.embedding_model_name, model_id(self.settings.embedding_model_name)):
            raise self._not_found(requested)
        return self._embedding


class Runtime:
    def __init__(self, settings: Settings, observer: InferenceObserver | None = None,
                 slots: InferenceSlots | None = None, loader: EngineLoader | None = None) -> None:
        self.settings = settings
        self.models = ModelHost(settings, loader)
        self.service = GenerationService(
            self.models, Limits(settings.request_timeout, settings.stall_timeout, settings.default_max_tokens), observer, slots)
        self.state = RuntimeState.LOADING
        self.failure: str | None = None
        self.stopping: Callable[[], bool] = lambda: False  # the service is stopping (set by the supervised worker)

    def load(self) -> None:
        """Load the models; on failure record why (health reports it) and re-raise."""
        try:
            self.models.load_default_models()
        except Exception as error:
            self.state = RuntimeState.FAILED
            self.failure = self.models.failure = str(error) or type(error).__name__
            raise
        self.state = RuntimeState.READY

    @property
    def ready(self) -> bool:
        return self.state is RuntimeState.READY

    def not_ready_because(self) -> str:
        """Why a request sent now would not be served ('' if it would): what /ready answers."""
        if self.state is RuntimeState.FAILED:
            return f"the model could not be loaded: {self.failure}"
        if self.state is RuntimeState.LOADING:
            return "the model is still loading"
        if self.stopping():
            return "the service is stopping (draining its last requests)"
        return self.service.slots.refusal()
