"""What the routes read of the running server (filled in by the app once the model is loaded)."""

from __future__ import annotations

from dataclasses import dataclass

from parcae_serve.model.tokenizer import Tokenizer
from parcae_serve.server.api.chat import ChatService
from parcae_serve.server.api.completions import CompletionService
from parcae_serve.server.api.settings import ServerSettings
from parcae_serve.server.engine.engine import Engine
from parcae_serve.server.engine.metrics import Metrics


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: Metrics
    engine: Engine | None = None
    service: CompletionService | None = None
    chat: ChatService | None = None
    tokenizer: Tokenizer | None = None
    model_card: dict | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
