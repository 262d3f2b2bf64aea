"""`python -m service`: serve the model named by the GENRET_* settings with uvicorn."""

from __future__ import annotations

import logging

from .settings import Settings


def main() -> None:
    import uvicorn

    from .app import create_app

    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One worker process: the engine holds the model (and vLLM its KV cache) once; vLLM batches
    # concurrent requests inside that process.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower())


if __name__ == "__main__":  # vLLM starts processes with spawn: they re-import this module
    main()
