"""`parcae-serve`: run the server (uvicorn) with draining on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
import time

import uvicorn

from parcae_serve.server.api.app import create_app
from parcae_serve.server.api.settings import ServerSettings, parse_args


class DrainingServer(uvicorn.Server):
    """First SIGTERM/SIGINT: /health turns 503, new requests get 503, running ones finish (up to
    the grace period), then uvicorn exits. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, settings: ServerSettings) -> None:
        super().__init__(config)
        self.settings = settings

    def handle_exit(self, sig: int, frame) -> None:
        state = self.config.app.state.parcae
        if state.draining or not state.ready:
            return super().handle_exit(sig, frame)
        state.draining = True
        threading.Thread(target=self._drain, args=(state, sig, frame), daemon=True).start()

    def _drain(self, state, sig: int, frame) -> None:
        deadline = time.monotonic() + self.settings.drain_grace
        while state.engine.pending > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False
    )
    DrainingServer(config, settings).run()


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
