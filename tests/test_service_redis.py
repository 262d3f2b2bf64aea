"""The Redis id store on a real Redis: publish, the atomic version switch under concurrent
readers, a running server picking up a new version, and 503 -> recovery when Redis goes away."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from service.app import create_app
from service.id_store import IdStoreUnavailable, RedisIdStore, catalog_records, keys_digest, publish
from service.settings import Settings
from tests.service_helpers import (  # noqa: F401  (fixtures)
    REDIS_URL, RedisServer, Served, hf_engine, namespace, run, stored)

REPO_ROOT = Path(__file__).resolve().parents[1]


def records(stored, host: str) -> dict[str, dict]:
    return catalog_records(stored, f"https://{host}/img/{{key}}")


async def publish_to(url: str, ns: str, recs: dict[str, dict], info: dict | None = None) -> str:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        return await publish(client, ns, recs, info=info)
    finally:
        await client.aclose()


def test_publish_then_lookup(run, stored, namespace):
    version = run(publish_to(REDIS_URL, namespace, records(stored, "cdn1")))
    store = RedisIdStore(REDIS_URL, namespace)
    try:
        found = run(store.lookup(["moon.jpg", "rocket.jpg", "not-there.jpg"]))
        assert found == {k: {"url": f"https://cdn1/img/{k}", "caption": stored.catalog[k].captions[0]}
                         for k in ["moon.jpg", "rocket.jpg"]}
        assert f"version {version}" in run(store.ping())
        # A record damaged by hand is left out, not a 500.
        import redis

        redis.Redis.from_url(REDIS_URL).hset(f"{namespace}:v:{version}", mapping={"moon.jpg": "{oops", "rocket.jpg": "[]"})
        assert set(run(store.lookup(["moon.jpg", "rocket.jpg", "horse.jpg"]))) == {"horse.jpg"}
    finally:
        run(store.close())


def test_republishing_switches_atomically_under_concurrent_readers(run, stored, namespace):
    keys = stored.catalog.keys()
    run(publish_to(REDIS_URL, namespace, records(stored, "cdn0")))
    store = RedisIdStore(REDIS_URL, namespace)
    seen_hosts = []

    async def read_until(done: asyncio.Event):
        while not done.is_set():
            found = await store.lookup(keys)
            hosts = {record["url"].split("/")[2] for record in found.values()}
            assert set(found) == set(keys), "a lookup lost mappings"
            assert len(hosts) == 1, f"a lookup mixed versions: {hosts}"
            seen_hosts.append(hosts.pop())
            await asyncio.sleep(0)

    async def republish(done: asyncio.Event):
        for i in range(1, 16):
            await publish_to(REDIS_URL, namespace, records(stored, f"cdn{i}"))
            await asyncio.sleep(0.002)
        done.set()

    async def scenario():
        done = asyncio.Event()
        await asyncio.gather(republish(done), *(read_until(done) for _ in range(4)))
        return await store.lookup(keys)

    try:
        final = run(scenario())
    finally:
        run(store.close())
    assert {record["url"].split("/")[2] for record in final.values()} == {"cdn15"}
    assert len(set(seen_hosts)) > 2, "the readers never overlapped a switch"
    # Only the active version and the one before it are kept.
    import redis

    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    assert sorted(r.scan_iter(match=f"{namespace}:v:*")) == [f"{namespace}:v:15", f"{namespace}:v:16"]


def test_concurrent_publishers_never_move_the_pointer_back(run, stored, namespace):
    async def both():
        return await asyncio.gather(*(publish_to(REDIS_URL, namespace, records(stored, f"p{i}")) for i in range(2)),
                                    return_exceptions=True)

    outcomes = run(both())
    won = [int(v) for v in outcomes if isinstance(v, str)]
    assert won and all(isinstance(o, (str, RuntimeError)) for o in outcomes)
    store = RedisIdStore(REDIS_URL, namespace)
    try:
        assert f"version {max(won)}" in run(store.ping())
        assert len(run(store.lookup(stored.catalog.keys()))) == len(stored.catalog)
    finally:
        run(store.close())


def test_publish_cli(stored, namespace, capsys):
    from service.publish import main

    done = subprocess.run([sys.executable, "-m", "service.publish", str(stored.path), "--redis-url", REDIS_URL,
                           "--namespace", namespace, "--url-template", "https://cdn.example.com/{name}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "published 8 images" in done.stdout
    import redis

    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    version = r.get(f"{namespace}:active")
    assert '"url": "https://cdn.example.com/moon.jpg"' in r.hget(f"{namespace}:v:{version}", "moon.jpg")
    info = json.loads(r.get(f"{namespace}:info:{version}"))
    assert (info["model"], info["images"], info["keys_sha256"]) == (stored.name, 8, keys_digest(stored.keys))
    # Failures: one line on stderr, status 2 (in-process: the same main()).
    assert main(["/no/such/model", "--redis-url", REDIS_URL, "--namespace", namespace]) == 2
    assert "not a trained model" in capsys.readouterr().err
    assert main([str(stored.path), "--redis-url", "redis://127.0.0.1:1/0", "--namespace", namespace]) == 2
    assert "ConnectionError" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # refused before the model is read or Redis is called
        main([str(stored.path), "--namespace", namespace, "--url-template", "https://x/{nope}"])
    assert exited.value.code == 2 and "{nope}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # "" wrote ":active", ":v:1", ... at the top of the keyspace
        main([str(stored.path), "--namespace", ""])
    assert exited.value.code == 2 and "'' is not a namespace" in capsys.readouterr().err
    assert r.get(f"{namespace}:active") == version


def test_a_running_server_serves_each_new_version(run, hf_engine, stored, namespace):
    run(publish_to(REDIS_URL, namespace, records(stored, "old")))
    served = Served(run, create_app(Settings(redis_url=REDIS_URL, id_store_namespace=namespace), engine=hf_engine))
    try:
        search = lambda: run(served.client.post("/search", json={"query": "the moon at night", "k": 3})).json()
        assert {hit["url"].split("/")[2] for hit in search()["results"]} == {"old"}
        run(publish_to(REDIS_URL, namespace, records(stored, "new")))
        assert {hit["url"].split("/")[2] for hit in search()["results"]} == {"new"}
        # An image unpublished from the id map is no longer returned.
        unpublished = {k: r for k, r in records(stored, "newer").items() if k != "moon.jpg"}
        run(publish_to(REDIS_URL, namespace, unpublished))
        assert "moon.jpg" not in {hit["image_id"] for hit in search()["results"]}
        # ... and describe, ask and /images no longer answer about it, as before for the others
        calls = lambda key: [run(served.client.post(f"/describe/{key}")),
                             run(served.client.post("/ask", json={"image_id": key, "question": "Is it night?"})),
                             run(served.client.get(f"/images/{key}"))]
        for r in calls("moon.jpg"):
            assert r.status_code == 404 and "not in the published id map" in r.json()["detail"], r.text
        assert [r.status_code for r in calls("rocket.jpg")] == [200, 200, 200]
        assert "redis" in run(served.client.get("/readyz")).json()["id_store"]
    finally:
        served.close()


def test_readyz_warns_of_an_id_map_published_from_another_model_or_before_a_change(run, hf_engine, stored, namespace,
                                                                                   caplog):
    """A stale map shows in search only as fewer results (hits it lacks are left out), so /readyz
    says so, and stays ready: in a rollout the map and the servers change one after the other."""
    run(publish_to(REDIS_URL, namespace, records(stored, "cdn"), info={"model": "other"}))
    served = Served(run, create_app(Settings(redis_url=REDIS_URL, id_store_namespace=namespace), engine=hf_engine))
    try:
        ready = lambda: run(served.client.get("/readyz"))
        assert ready().status_code == 200
        for _ in range(100):  # the log says it once, as the engine becomes ready
            if any("published from model 'other'" in r.getMessage() for r in caplog.records):
                break
            run(asyncio.sleep(0.05))
        else:
            raise AssertionError("no warning logged at start")
        assert ready().json()["warning"] == (
            f"the id store's active map was published from model 'other', and this server serves model "
            f"{stored.name!r}: hits the map lacks are left out (python -m service.publish {stored.name} "
            f"--namespace {namespace})")
        fewer = {k: r for k, r in records(stored, "cdn").items() if k != "moon.jpg"}  # as before `genret add`
        run(publish_to(REDIS_URL, namespace, fewer, info={"model": stored.name}))
        assert ready().status_code == 200
        assert ready().json()["warning"].startswith(f"the id store's active map holds {len(fewer)} images, and "
                                                    f"model {stored.name!r} has {len(fewer) + 1}: ")
        renamed = {("moon-v2.jpg" if k == "moon.jpg" else k): r for k, r in records(stored, "cdn").items()}
        run(publish_to(REDIS_URL, namespace, renamed, info={"model": stored.name, "keys_sha256": keys_digest(renamed)}))
        assert ready().json()["warning"].startswith(f"the id store's active map holds other images than model "
                                                    f"{stored.name!r} (as many, {len(renamed)}): ")
        right = records(stored, "cdn")  # as `python -m service.publish` records it
        run(publish_to(REDIS_URL, namespace, right, info={"model": stored.name, "keys_sha256": keys_digest(right)}))
        assert ready().status_code == 200 and "warning" not in ready().json()
    finally:
        served.close()


def test_nothing_published_is_503_with_the_fix(run, hf_engine, namespace):
    import httpx

    app = create_app(Settings(redis_url=REDIS_URL, id_store_namespace=namespace), engine=hf_engine)

    async def probe():  # not via Served: that waits for /readyz, which is what this checks
        async with app.router.lifespan_context(app):
            while not app.state.services.engine_ready:
                await asyncio.sleep(0.05)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await c.get("/readyz"), await c.post("/search", json={"query": "a horse"})

    ready, search = run(probe())
    assert ready.status_code == search.status_code == 503
    assert "nothing is published" in search.json()["detail"] and "service.publish" in search.json()["detail"]


def test_redis_down_is_503_and_the_service_recovers_by_itself(run, hf_engine, stored, tmp_path):
    redis_server = RedisServer(tmp_path).start()
    try:
        run(publish_to(redis_server.url, "genret", records(stored, "cdn")))
        settings = Settings(redis_url=redis_server.url, redis_timeout_s=0.5)
        served = Served(run, create_app(settings, engine=hf_engine))
        try:
            client = served.client
            search = lambda: run(client.post("/search", json={"query": "a cup of coffee", "k": 2}))
            assert search().status_code == 200

            redis_server.stop()  # refused connections
            down = search()
            assert down.status_code == 503 and "Redis is unavailable" in down.json()["detail"]
            assert run(client.get("/readyz")).status_code == 503
            assert run(client.get("/healthz")).status_code == 200

            redis_server.start()  # same port, data kept: no restart, no re-publish
            assert search().status_code == 200
            assert run(client.get("/readyz")).status_code == 200

            redis_server.freeze()  # a hung Redis: the socket timeout turns it into a 503, not a hang
            try:
                hung = search()
                assert hung.status_code == 503 and "Timeout" in hung.json()["detail"]
            finally:
                redis_server.thaw()
            recovered = search()
            assert recovered.status_code == 200 and len(recovered.json()["results"]) == 2
        finally:
            served.close()
    finally:
        redis_server.stop()


def test_store_errors_are_typed(run):
    store = RedisIdStore("redis://127.0.0.1:1/0", "x", timeout_s=0.5)
    try:
        with pytest.raises(IdStoreUnavailable, match="Redis is unavailable"):
            run(store.lookup(["a"]))
    finally:
        run(store.close())
