"""`parcae-serve`: run the server (uvicorn) with draining on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os

from parcae_serve.server.api.openmp import spin_briefly_when_idle

spin_briefly_when_idle()  # before anything below loads torch, and with it OpenMP

import uvicorn  # noqa: E402

from parcae_serve.server.api.app import create_app  # noqa: E402
from parcae_serve.server.api.settings import ServerSettings, parse_args  # noqa: E402

log = logging.getLogger("parcae.serve")
SHUTDOWN_SLACK_S = 1.0  # after the grace: for ended streams to send their last bytes


class DrainingServer(uvicorn.Server):
    """First SIGTERM/SIGINT: /health turns 503, new requests get 503, running ones finish for up
    to --drain-grace seconds; those still running then end with finish_reason "abort" (a final
    event and `data: [DONE]` for streams), and the process exits 0. A second signal exits at
    once (status 128 + signal)."""

    def __init__(self, config: uvicorn.Config, settings: ServerSettings) -> None:
        super().__init__(config)
        self.settings = settings
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        state = self.config.app.state.parcae
        if self.should_exit or state.draining:
            log.warning("second signal: exiting now")
            os._exit(128 + sig)
        if not state.ready or self.loop is None:
            self.should_exit = True
            return
        state.draining = True
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain(state)))

    async def _drain(self, state) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_grace
        while state.engine.pending > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if state.engine.pending > 0:
            ended = state.service.abort_all()
            log.warning("drain grace over: ending %d running sequences", ended)
            while state.engine.pending > 0 and loop.time() < deadline + SHUTDOWN_SLACK_S:
                await asyncio.sleep(0.02)
        self.should_exit = True


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_SLACK_S,
    )
    DrainingServer(config, settings).run()


if __name__ == "__main__":
    main()  # SIGPIPE stays ignored (Python's default): a peer gone is an error, not a kill
