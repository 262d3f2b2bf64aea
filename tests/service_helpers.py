"""Shared pieces of the service tests: one event loop per module, apps served over ASGI with
their lifespan running, and real Redis servers (the shared one, or one a test may stop).

The tests are plain functions that drive coroutines with `run(...)`: a module's engine and
every app and client it serves live on that module's one loop, which vLLM's async engine
requires (its output handler is bound to the loop it first ran on).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def run():
    """`run(coro)` runs a coroutine on the module's event loop."""
    with asyncio.Runner() as runner:
        yield runner.run


@pytest.fixture(scope="module")
def stored(tiny_model_dir):
    """The tiny model, opened once per module (test_service_vllm overrides it with both kinds)."""
    from genret.model_store import StoredModel

    return StoredModel.open(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_engine(run, stored):
    """The transformers engine on the module's `stored` model, started on the module's loop."""
    from service.engine_hf import HFEngine

    engine = HFEngine(stored, device="cpu")
    run(engine.start())
    yield engine
    run(engine.close())


@asynccontextmanager
async def serve(app, ready_timeout_s: float = 600):
    """An HTTP client on `app` (httpx over ASGI) with the app's lifespan running, once /readyz says ready."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://genret.test") as client:
            deadline = time.monotonic() + ready_timeout_s
            while (r := await client.get("/readyz")).status_code != 200:
                services = app.state.services
                if services.load_error or time.monotonic() > deadline:
                    raise RuntimeError(f"app not ready: {r.json()}")
                await asyncio.sleep(0.1)
            yield client


class Served:
    """serve() held open across a module's tests: `client` stays valid until close()."""

    def __init__(self, run, app):
        self.run, self.app = run, app
        self._cm = serve(app)
        self.client: httpx.AsyncClient = run(self._cm.__aenter__())

    def close(self):
        self.run(self._cm.__aexit__(None, None, None))


def redis_available(url: str = REDIS_URL) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def namespace():
    """A fresh Redis namespace per test; its keys are deleted afterwards."""
    import redis

    if not redis_available():
        pytest.skip(f"no Redis answers at {REDIS_URL} (CI starts one: .ci/run)")
    ns = f"genret-test-{uuid.uuid4().hex[:12]}"
    yield ns
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{ns}:*"))
    if keys:
        r.delete(*keys)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server the test can stop, freeze and restart; its data survives a restart
    (append-only file, fsync on every write), as a production Redis with persistence would."""

    def __init__(self, data_dir: Path):
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        self.port, self.dir = free_port(), data_dir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not redis_available(self.url):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)  # connections hang instead of being refused

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
