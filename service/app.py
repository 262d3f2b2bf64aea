"""The HTTP API: search, describe, ask; health, readiness, metrics; the demo's images.

The engine loads in the background after startup (vLLM takes a minute), so /healthz answers
at once and /readyz says why the service is not ready yet. Every client mistake is a 4xx
with a reason; a dependency that is down is a 503 with a reason; a slow request is a 504.
"""

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager, suppress
from functools import cached_property
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from genret.catalog import is_blank
from genret.decoding import EmbeddingReranker
from genret.model_store import ModelStoreError, StoredModel, UntrainedTask

from .engine import Engine, EngineError, InputTooLong, make_engine
from .id_store import EmbeddedIdStore, IdStore, IdStoreUnavailable, RedisIdStore, keys_digest
from .settings import Settings

log = logging.getLogger("service")


class SearchHit(BaseModel):
    model_config = ConfigDict(extra="allow")  # further metadata from the id store passes through
    image_id: str
    url: str
    score: float = Field(description="the id's log-probability given the query (higher is better), minus "
                               "GENRET_BEAM_HUBNESS_WEIGHT x the image's hubness, plus GENRET_ADDED_ID_BONUS for "
                               "an image added after training; with re-ranking on, plus "
                               "GENRET_RERANK_WEIGHT x the query-image similarity, minus GENRET_HUBNESS_WEIGHT x "
                               "the image's hubness")
    caption: str | None = None


class SearchResponse(BaseModel):
    query: str
    model: str
    results: list[SearchHit]


class DescribeResponse(BaseModel):
    image_id: str
    description: str


class AskResponse(BaseModel):
    image_id: str
    question: str
    answer: str
    yes_probability: float | None = Field(description=(
        "for an answer that is yes or no: P(Yes) / (P(Yes) + P(No)) at its first token, how far the model "
        "leaned (the answer is yes above 0.5), for a threshold of your own; null for any other answer"))


class EscapedJSONResponse(JSONResponse):
    """JSON with everything past ASCII escaped. A validation error echoes the request's input,
    and a lone surrogate ("\\ud800" is valid JSON, but no string pydantic accepts) has no UTF-8."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class Metrics:
    """Per-app registry, so several apps (tests) can live in one process."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("genret_requests", "HTTP requests", ["endpoint", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("genret_request_seconds", "HTTP request latency", ["endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        queue = Gauge("genret_engine_queue_depth", "engine calls waiting or running", registry=self.registry)
        queue.set_function(lambda: engine.queue_depth)


class Services:
    """What the routes share: the model, the engine, the id store, and whether they are ready."""

    def __init__(self, settings: Settings, engine: Engine, id_store: IdStore):
        self.settings, self.engine, self.id_store = settings, engine, id_store
        self.stored: StoredModel = engine.stored
        self.model_name: str = self.stored.name
        self.engine_ready = False
        self.load_error: str | None = None
        self.reranker: EmbeddingReranker | None = None
        if settings.reranks and not self.stored.can_rerank:
            raise ModelStoreError(f"{self.stored.path}: re-ranking (GENRET_RERANK_WEIGHT={settings.rerank_weight:g}, "
                                  f"GENRET_HUBNESS_WEIGHT={settings.hubness_weight:g}) needs the model's "
                                  "alignment.safetensors and image_embeddings.npy, which it lacks")
        for name, weight in (("GENRET_HUBNESS_WEIGHT", settings.hubness_weight),
                             ("GENRET_BEAM_HUBNESS_WEIGHT", settings.beam_hubness_weight)):
            if weight > 0 and not self.stored.has_image_hubness:
                raise ModelStoreError(f"{self.stored.path}: {name}={weight:g} needs the model's image_hubness.npy, "
                                      "which models trained before it lack: retrain it")
        if untrained := [task for task in ("describe", "ask") if task not in self.stored.tasks]:
            log.warning("model %s was not trained to %s: such requests answer 409", self.model_name,
                        " or ".join(untrained))
        if settings.added_id_bonus > 0 and not self.stored.has_added_images:
            log.warning("GENRET_ADDED_ID_BONUS=%g changes nothing: model %s has no images added after training",
                        settings.added_id_bonus, self.model_name)

    async def load(self) -> None:
        try:
            t = time.perf_counter()
            if self.settings.reranks:
                self.reranker = await asyncio.to_thread(EmbeddingReranker, self.stored, self.settings.rerank_weight,
                                                        hubness_weight=self.settings.hubness_weight)
            await self.engine.start()
            # the slow first request (allocations, and the engine's hubness prior: seconds at a
            # million ids) is not a user's
            await self.engine.search("warm up", 1, 1, prior=self.settings.search_prior)
            self.engine_ready = True
            log.info("%s engine ready on model %s in %.1f s; search settings %s", self.engine.name, self.model_name,
                     time.perf_counter() - t, self.settings.search)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("the engine failed to load")
            return
        with suppress(IdStoreUnavailable):  # /readyz says so
            if mismatch := await self.id_map_mismatch():
                log.warning("%s", mismatch)

    async def id_map_mismatch(self) -> str | None:
        """Why the active id map may not be this model's: published from another model, or from
        this one before `genret add` or `genret remove` changed it. Search leaves out every hit
        the map lacks, so a stale map shows only as fewer results; /readyz and the log say it."""
        info = await self.id_store.published()
        model, images = info.get("model"), info.get("images")
        fix = f"python -m service.publish {self.model_name} --namespace {self.settings.id_store_namespace}"
        if model is not None and model != self.model_name:
            return (f"the id store's active map was published from model {model!r}, and this server serves model "
                    f"{self.model_name!r}: hits the map lacks are left out ({fix})")
        if images is not None and images != (size := len(self.stored.keys)):
            return (f"the id store's active map holds {images} images, and model {self.model_name!r} has {size}: "
                    f"hits the map lacks are left out ({fix})")
        if info.get("keys_sha256") not in (None, self._keys_digest):
            return (f"the id store's active map holds other images than model {self.model_name!r} (as many, "
                    f"{images}): hits the map lacks are left out ({fix})")
        return None

    @cached_property
    def _keys_digest(self) -> str:
        return keys_digest(self.stored.keys)

    def require_engine(self) -> Engine:
        if not self.engine_ready:
            raise EngineError(self.load_error or f"the {self.engine.name} engine is still loading the model")
        return self.engine

    async def require_known(self, image_id: str) -> None:
        """404 for an image the model lacks, or one the active id map no longer holds (unpublished
        from Redis, say after `genret remove`): search leaves such an image out, so nothing else
        may answer about it either."""
        if image_id not in self.stored.id_tokens:
            raise HTTPException(404, f"unknown image_id {image_id!r}: model {self.model_name!r} has not memorized it")
        if image_id not in await self.id_store.lookup([image_id]):
            raise HTTPException(404, f"image_id {image_id!r} is not in the published id map of model "
                                     f"{self.model_name!r}")

    def known_within(self, keys: list[str]) -> frozenset[str]:
        """The images a search is restricted to, or a 422 naming those the model lacks (a search
        within them would quietly look elsewhere, or nowhere)."""
        within = frozenset(keys)
        if unknown := sorted(key for key in within if key not in self.stored.id_tokens):
            raise HTTPException(422, f"within: {len(unknown)} of its {len(within)} image ids are not in model "
                                     f"{self.model_name!r}, e.g. {unknown[:5]}")
        return within

    def left_out(self, keys: list[str], within: frozenset[str] | None) -> frozenset[str]:
        """The images a search leaves out that it could otherwise return, or a 422 when none would be
        left. Ids the model lacks are left out already (a page of hits to skip may name an image
        removed since), so they are no error."""
        exclude = frozenset(keys).intersection(self.stored.id_tokens)
        searched = len(self.stored.id_tokens) if within is None else len(within)
        if exclude and len(exclude if within is None else exclude & within) == searched:
            where = "the model's" if within is None else "the within list's"
            raise HTTPException(422, f"exclude leaves out all {searched} of {where} images: none to search")
        return exclude

    async def deadline(self, coro):
        try:
            return await asyncio.wait_for(coro, self.settings.request_timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"the request took longer than {self.settings.request_timeout_s:g} s") from None


def create_app(settings: Settings | None = None, engine: Engine | None = None, id_store: IdStore | None = None) -> FastAPI:
    """An engine or id store passed in belongs to the caller (tests share one vLLM engine
    between apps): the app starts the engine if needed but closes only what it made."""
    settings = settings or Settings()
    own_engine, own_store = engine is None, id_store is None
    if engine is None:
        engine = make_engine(settings, StoredModel.open(settings.model_path, images_dir=settings.images_dir))
    if id_store is None:
        id_store = (RedisIdStore(settings.redis_url, settings.id_store_namespace, settings.redis_timeout_s)
                    if settings.redis_url else EmbeddedIdStore(engine.stored, settings.public_url))
    services = Services(settings, engine, id_store)
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(services.load())
        try:
            yield
        finally:
            loading.cancel()
            with suppress(asyncio.CancelledError):
                await loading
            if own_engine:
                await engine.close()
            if own_store:
                await id_store.close()

    app = FastAPI(title="genret", description="Generative cross-modal retrieval: text -> memorized image ids, "
                  "and descriptions / answers about an image from its id alone.", lifespan=lifespan)
    app.state.services = services

    # Built here because the limits come from the settings. (No `from __future__ import
    # annotations` in this module: FastAPI must see these local classes, not their names.)
    Query = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=settings.max_query_chars),
                      AfterValidator(visible_text)]

    ImageId = Annotated[str, StringConstraints(min_length=1, max_length=1000)]

    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        query: Query
        # strict: JSON's true or "3" is a client's slip, not a count (lax pydantic reads them as 1 and 3)
        k: int = Field(settings.default_k, ge=1, le=settings.max_k, strict=True)
        within: list[ImageId] | None = Field(
            None, min_length=1, max_length=settings.max_within,
            description="search these images alone (an album, a shop's products, a user's uploads): the beam "
                        "only ever follows their ids, so all k places go to them; every one must be an image "
                        "of the model (422 names those that are not)")
        exclude: list[ImageId] | None = Field(
            None, max_length=settings.max_exclude,
            description="leave these images out (the hits already shown, for the next page; those a user hid): "
                        "the beam never follows their ids, so all k places go to the others; ids the model "
                        "lacks are ignored")

    class AskRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        image_id: ImageId
        question: Query

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    guarded = [Depends(api_key_checker(settings))] if settings.api_key else []

    @app.middleware("http")
    async def measure(request: Request, call_next):
        t = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            metrics.requests.labels(endpoint, request.method, str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, e: RequestValidationError):
        return EscapedJSONResponse({"detail": jsonable_encoder(e.errors())}, status_code=422)

    @app.exception_handler(IdStoreUnavailable)
    async def id_store_unavailable(_: Request, e: IdStoreUnavailable):
        return JSONResponse({"detail": f"id store unavailable: {e}"}, status_code=503)

    @app.exception_handler(EngineError)
    async def engine_unavailable(_: Request, e: EngineError):
        return JSONResponse({"detail": f"engine unavailable: {e}"}, status_code=503)

    @app.exception_handler(UntrainedTask)
    async def untrained_task(_: Request, e: UntrainedTask):
        return JSONResponse({"detail": str(e)}, status_code=409)

    @app.exception_handler(InputTooLong)
    async def input_too_long(_: Request, e: InputTooLong):
        return JSONResponse({"detail": str(e)}, status_code=422)

    @app.post("/search", response_model=SearchResponse, response_model_exclude_none=True, dependencies=guarded)
    async def search(body: SearchRequest) -> SearchResponse:
        """Top-k catalog images for a text query, by the model's trie-constrained beam search (with
        GENRET_BEAM_HUBNESS_WEIGHT or GENRET_ADDED_ID_BONUS > 0, searching by log-probability plus
        their offsets, genret.decoding.PriorWeights; with GENRET_RERANK_WEIGHT or
        GENRET_HUBNESS_WEIGHT > 0, a wider beam re-ranked by the two-tower); with `within`, among
        those images alone; with `exclude`, among all but those."""
        within = None if body.within is None else services.known_within(body.within)
        exclude = None if not body.exclude else services.left_out(body.exclude, within)
        engine = services.require_engine()

        async def run():
            if services.reranker is None:
                hits = await engine.search(body.query, body.k, max(settings.beams, body.k),
                                           prior=settings.search_prior, within=within,
                                           exclude=exclude)
            else:  # a wider beam, re-scored with the two-tower (GENIUS)
                beams = max(settings.rerank_beams, body.k)
                hits = await engine.search(body.query, beams, beams, prior=settings.search_prior, within=within,
                                           exclude=exclude)
                [hits] = await asyncio.to_thread(services.reranker, [body.query], [hits])
                hits = hits[: body.k]
            return hits, await id_store.lookup([h.key for h in hits])

        hits, records = await services.deadline(run())
        results = []
        for h in hits:
            # A key the active id map lacks (an image unpublished from Redis) is not returned.
            if h.key in records:
                try:
                    results.append(SearchHit.model_validate({**records[h.key], "image_id": h.key, "score": h.score}))
                except ValidationError as e:
                    log.warning("id store record of %r is unusable, skipped: %s", h.key, e)
        return SearchResponse(query=body.query, model=services.model_name, results=results)

    @app.post("/describe/{image_id:path}", response_model=DescribeResponse, dependencies=guarded)
    async def describe(image_id: Annotated[str, Path(max_length=1000)]) -> DescribeResponse:
        """A description of a memorized image, generated from its id alone."""
        services.stored.require_trained_to("describe")
        await services.require_known(image_id)
        engine = services.require_engine()
        return DescribeResponse(image_id=image_id, description=await services.deadline(engine.describe(image_id)))

    @app.post("/ask", response_model=AskResponse, dependencies=guarded)
    async def ask(body: AskRequest) -> AskResponse:
        """An answer to a question about a memorized image, from its id alone."""
        services.stored.require_trained_to("ask")
        await services.require_known(body.image_id)
        engine = services.require_engine()
        answer = await services.deadline(engine.ask(body.image_id, body.question))
        return AskResponse(image_id=body.image_id, question=body.question, answer=answer.text,
                           yes_probability=answer.yes_probability)

    @app.get("/healthz")
    async def healthz():
        """The process answers (it may still be loading the model: see /readyz)."""
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        """200 once the engine has loaded the model and the id store answers; 503 with the reason otherwise."""
        if not services.engine_ready or engine.failure():
            reason = (engine.failure() or services.load_error
                      or f"the {engine.name} engine is loading model {services.model_name!r}")
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        try:
            store = await asyncio.wait_for(id_store.ping(), settings.redis_timeout_s + 1)
            mismatch = await asyncio.wait_for(services.id_map_mismatch(), settings.redis_timeout_s + 1)
        except (IdStoreUnavailable, TimeoutError) as e:
            return JSONResponse({"status": "not ready", "reason": f"id store: {e or 'timed out'}"}, status_code=503)
        # ready all the same: during a rollout the map and the servers change one after the other
        return {"status": "ready", "model": services.model_name, "engine": engine.name, "id_store": store,
                "search": settings.search, "tasks": services.stored.tasks,
                "images": len(services.stored.keys), **({"warning": mismatch} if mismatch else {})}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/images/{image_id:path}")
    async def image(image_id: str):
        """The catalog's image file, for the demo (URLs of the embedded id store point here)."""
        # read once, off the event loop: a million images' catalog.json takes seconds
        catalog = await asyncio.to_thread(lambda: services.stored.catalog)
        if image_id not in catalog or not catalog[image_id].path.is_file():
            raise HTTPException(404, f"no image {image_id!r} in model {services.model_name!r}")
        await services.require_known(image_id)
        return FileResponse(catalog[image_id].path)

    @app.get("/", include_in_schema=False)
    async def root():
        return {"service": "genret", "model": services.model_name, "engine": engine.name, "docs": "/docs"}

    return app


def visible_text(text: str) -> str:
    """A query or question of zero-width or control characters alone is blank too (strip keeps them)."""
    if is_blank(text):
        raise ValueError("the text has no visible characters, only control or zero-width ones")
    return text


def api_key_checker(settings: Settings):
    """A dependency that lets a request through only with `Authorization: Bearer <GENRET_API_KEY>`.
    HTTPBearer also puts the scheme in the OpenAPI docs, whose Authorize button then sends it."""
    expected = settings.api_key.get_secret_value().encode()

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False))):
        if credentials is None:
            raise HTTPException(401, "this server requires an API key: send the header 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(credentials.credentials.encode(), expected):  # no timing to guess it by
            raise HTTPException(401, "wrong API key", headers={"WWW-Authenticate": "Bearer"})

    return check
