"""`python -m service`: serve the model named by the GENRET_* settings with uvicorn."""

from __future__ import annotations

import logging
import socket
import sys

from .settings import SettingsError, load_settings


def bind_error(host: str, port: int) -> OSError | None:
    """Why uvicorn could not listen there (a port in use, say), found before the model loads:
    vLLM takes a minute, and its shutdown logs would bury uvicorn's one line."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as e:
            return e
    return None


def main() -> int:
    import uvicorn

    from genret.model_store import ModelStoreError

    from .app import create_app

    try:
        settings = load_settings()
    except SettingsError as e:
        print(f"service: {e}", file=sys.stderr)
        return 2
    if error := bind_error(settings.host, settings.port):
        print(f"service: cannot listen on {settings.host}:{settings.port} (GENRET_HOST, GENRET_PORT): "
              f"{error.strerror or error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings)
    except ModelStoreError as e:
        missing = settings.model == "demo" and not settings.model_path.exists()
        hint = " (`genret demo` trains the demo model)" if missing else ""
        print(f"service: {e}{hint}", file=sys.stderr)
        return 2
    # One worker process: the engine holds the model (and vLLM its KV cache) once; vLLM batches
    # concurrent requests inside that process.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    return 0


if __name__ == "__main__":  # vLLM starts processes with spawn: they re-import this module
    sys.exit(main())
