"""Image key -> URL and metadata: from the model's catalog (one machine) or from Redis (a fleet).

Redis layout (namespace `ns`, default "genret"):
    {ns}:active         the version being served (a decimal number)
    {ns}:v:{version}    hash: image key -> JSON {"url": ..., "caption": ..., ...}
    {ns}:info:{version} JSON about the version (model, count, time)
    {ns}:next_version   counter that numbers versions
    {ns}:versions       set of the versions written (for deleting old ones)

A version's hash is written completely before `{ns}:active` points at it, and the pointer
moves in one atomic step, so a reader resolves all keys of a request against one version:
whole-old or whole-new, never a mix. The pointer is read on every lookup (one GET), so
running servers serve a new version as soon as it is published. The previous version is
kept until the next publish so that lookups in flight during a switch still find theirs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Iterable, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from genret.model_store import StoredModel

log = logging.getLogger(__name__)

__all__ = ["EmbeddedIdStore", "IdStore", "IdStoreUnavailable", "RedisIdStore", "catalog_records", "keys_digest",
           "publish"]


class IdStoreUnavailable(RuntimeError):
    """The id store cannot answer now (Redis down, or nothing published): the service answers 503."""


class IdStore(Protocol):
    name: str

    async def lookup(self, keys: list[str]) -> dict[str, dict]:
        """Records of the keys that the store knows (unknown keys are left out)."""

    async def ping(self) -> str:
        """A line about the store's state; raises IdStoreUnavailable when it cannot answer."""

    async def published(self) -> dict:
        """What the active id map records of itself ({"model", "images", "keys_sha256",
        "published"}); {} where the map is the served model's own catalog."""

    async def close(self) -> None: ...


def keys_digest(keys: Iterable[str]) -> str:
    """A fingerprint of a set of image keys: publish records the map's, and a server compares its
    model's, so a map of other images (as many of them) shows too."""
    return hashlib.sha256("".join(f"{key}\0" for key in sorted(keys)).encode("utf-8", "surrogatepass")).hexdigest()


def catalog_records(stored: StoredModel, url_template: str) -> dict[str, dict]:
    """One record per catalog image. `url_template` is formatted with `key` (URL-quoted) and
    `name` (the image's file name), e.g. "https://cdn.example.com/flickr/{name}"."""
    from urllib.parse import quote

    records = {}
    for image in stored.catalog:
        record = {"url": url_template.format(key=quote(image.key), name=quote(image.path.name))}
        if image.captions:
            record["caption"] = image.captions[0]
        records[image.key] = record
    return records


class EmbeddedIdStore:
    """The model's own catalog, with URLs pointing at this service's /images route."""

    name = "embedded"

    def __init__(self, stored: StoredModel, public_url: str):
        self.records = catalog_records(stored, public_url.rstrip("/") + "/images/{key}")

    async def lookup(self, keys: list[str]) -> dict[str, dict]:
        return {k: self.records[k] for k in keys if k in self.records}

    async def ping(self) -> str:
        return f"embedded catalog of {len(self.records)} images"

    async def published(self) -> dict:
        return {}

    async def close(self) -> None:
        pass


def connect(redis_url: str, timeout_s: float = 2.0) -> aioredis.Redis:
    """Short socket timeouts: a dead Redis costs a request `timeout_s`, not a hang. The pool drops
    broken connections and dials again on the next call, so the service recovers by itself."""
    return aioredis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                   health_check_interval=10, decode_responses=True)


def _parse(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return None


class RedisIdStore:
    name = "redis"

    def __init__(self, redis_url: str, namespace: str = "genret", timeout_s: float = 2.0):
        self.ns = namespace
        self.redis = connect(redis_url, timeout_s)

    async def _call(self, coro):
        try:
            return await coro
        except RedisError as e:
            raise IdStoreUnavailable(f"Redis is unavailable: {type(e).__name__}: {e}") from e

    async def active_version(self) -> str:
        version = await self._call(self.redis.get(f"{self.ns}:active"))
        if version is None:
            raise IdStoreUnavailable(f"nothing is published under namespace {self.ns!r} "
                                     f"(run: python -m service.publish MODEL --namespace {self.ns})")
        return version

    async def lookup(self, keys: list[str]) -> dict[str, dict]:
        if not keys:
            return {}
        for _ in range(3):
            version = await self.active_version()
            values = await self._call(self.redis.hmget(f"{self.ns}:v:{version}", keys))
            # Publishing keeps the version it replaces and deletes older ones, so only a lookup
            # that slept through two publishes finds its hash gone: it reads the pointer again.
            if any(v is not None for v in values) or await self.active_version() == version:
                break
        found = {}
        for key, value in zip(keys, values):
            if value is not None and isinstance(record := _parse(value), dict):
                found[key] = record
            elif value is not None:
                log.warning("id store record of %r in %s:v:%s is not a JSON object; skipped", key, self.ns, version)
        return found

    async def ping(self) -> str:
        version = await self.active_version()
        info = await self._call(self.redis.get(f"{self.ns}:info:{version}"))
        return f"redis namespace {self.ns!r}, version {version}" + (f": {info}" if info else "")

    async def published(self) -> dict:
        info = _parse(await self._call(self.redis.get(f"{self.ns}:info:{await self.active_version()}")) or "{}")
        return info if isinstance(info, dict) else {}

    async def close(self) -> None:
        await self.redis.aclose()


# Point `active` at the new version only if it is newer than the one active now, and return
# the version it replaced. Atomic (a Lua script), so two concurrent publishes cannot both
# win, nor move the pointer back to an older version.
_SWITCH = """
local current = redis.call('GET', KEYS[1])
if current and tonumber(current) >= tonumber(ARGV[1]) then return {0, current} end
redis.call('SET', KEYS[1], ARGV[1])
return {1, current or ''}
"""


async def publish(redis: aioredis.Redis, namespace: str, records: dict[str, dict], info: dict | None = None,
                  chunk: int = 10_000) -> str:
    """Write `records` as a new version, switch the active pointer to it, and delete versions
    older than the one it replaced. Returns the new version."""
    ns = namespace
    version = str(await redis.incr(f"{ns}:next_version"))
    await redis.sadd(f"{ns}:versions", version)  # first, so a crash below leaves nothing untracked
    items = list(records.items())
    for start in range(0, len(items), chunk):
        await redis.hset(f"{ns}:v:{version}", mapping={k: json.dumps(r) for k, r in items[start:start + chunk]})
    meta = {"published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "images": len(records), **(info or {})}
    await redis.set(f"{ns}:info:{version}", json.dumps(meta))
    switched, previous = await redis.eval(_SWITCH, 1, f"{ns}:active", version)
    if not switched:
        await _delete_versions(redis, ns, [version])
        raise RuntimeError(f"version {previous} was published while {version} was being written; {version} discarded")
    if previous:
        await _delete_versions(redis, ns, await _versions_below(redis, ns, int(previous)))
    return version


async def _versions_below(redis: aioredis.Redis, ns: str, bound: int) -> list[str]:
    return [v for v in await redis.smembers(f"{ns}:versions") if int(v) < bound]


async def _delete_versions(redis: aioredis.Redis, ns: str, versions: Iterable[str]) -> None:
    for v in versions:
        await redis.delete(f"{ns}:v:{v}", f"{ns}:info:{v}")
        await redis.srem(f"{ns}:versions", v)
