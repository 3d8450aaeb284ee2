"""What the routes read of the running server (filled in by the app once the model is loaded)."""

from __future__ import annotations

from dataclasses import dataclass

from model.tokenizer import Tokenizer
from server.completions import CompletionService
from server.engine import Engine
from server.metrics import Metrics
from server.settings import ServerSettings


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: Metrics
    engine: Engine | None = None
    service: CompletionService | None = None
    tokenizer: Tokenizer | None = None
    model_card: dict | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
