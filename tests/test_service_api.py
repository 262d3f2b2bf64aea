"""The HTTP contract, over ASGI, on the tiny model with the transformers engine and the
embedded id store: results, errors (4xx with reasons, never a 500), readiness, metrics."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from genret.model_store import StoredModel
from service.app import create_app
from service.engine_hf import HFEngine
from service.settings import Settings
from tests.service_helpers import Served, hf_engine, run, stored  # noqa: F401  (fixtures)

MAX_K, MAX_CHARS = 8, 200
MAX_WITHIN = MAX_EXCLUDE = 5
SETTINGS = dict(max_k=MAX_K, default_k=3, beams=3, max_query_chars=MAX_CHARS, max_within=MAX_WITHIN,
                max_exclude=MAX_EXCLUDE,
                public_url="http://img.test")


@pytest.fixture(scope="module")
def served(run, hf_engine):
    served = Served(run, create_app(Settings(**SETTINGS), engine=hf_engine))
    yield served
    served.close()


@pytest.fixture
def client(served):
    return served.client


def test_healthz_and_readyz(run, client, hf_engine):
    assert run(client.get("/healthz")).json() == {"status": "alive"}
    ready = run(client.get("/readyz"))
    assert ready.status_code == 200
    assert ready.json()["engine"] == "transformers" and "embedded" in ready.json()["id_store"]
    # how searches rank, so an operator can see that the settings took
    assert ready.json()["search"] == {"beams": 3, "beam_hubness_weight": 0.0, "added_id_bonus": 0.0,
                                      "rerank_beams": 50, "rerank_weight": 0.0, "hubness_weight": 0.0}
    assert ready.json()["tasks"] == ["search", "describe", "ask"]  # what the model was trained to do
    assert ready.json()["images"] == len(hf_engine.stored.keys)  # how many a client can page through


def test_search_returns_k_catalog_images_with_urls(run, client, tiny_catalog):
    r = run(client.post("/search", json={"query": "an astronaut in an orange suit", "k": 4}))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 4
    keys = [hit["image_id"] for hit in results]
    assert len(set(keys)) == 4 and set(keys) <= set(tiny_catalog.keys())
    assert [hit["score"] for hit in results] == sorted((hit["score"] for hit in results), reverse=True)
    for hit in results:
        assert hit["url"] == f"http://img.test/images/{hit['image_id']}"
        assert hit["caption"] == tiny_catalog[hit["image_id"]].captions[0]


def test_a_search_within_some_images_returns_those_alone_ranked_as_the_engine_ranks_them(run, client, hf_engine):
    within = ["moon.jpg", "coins.jpg", "rocket.jpg", "coffee.jpg"]
    r = run(client.post("/search", json={"query": "a cup of coffee", "k": 3, "within": within + ["moon.jpg"]}))
    assert r.status_code == 200, r.text
    expected = run(hf_engine.search("a cup of coffee", 3, 3, within=frozenset(within)))
    assert [hit["image_id"] for hit in r.json()["results"]] == [h.key for h in expected]
    assert {hit["image_id"] for hit in r.json()["results"]} < set(within)
    r = run(client.post("/search", json={"query": "a cup of coffee", "k": 3, "within": ["moon.jpg"]}))
    assert [hit["image_id"] for hit in r.json()["results"]] == ["moon.jpg"]


def test_a_search_that_leaves_images_out_gives_the_next_page(run, client, hf_engine, tiny_catalog):
    """exclude = the hits already shown: the next k, ranked as the engine ranks all but those; ids
    the model lacks (removed since, say) change nothing; leaving out every image is a 422."""
    first = [hit["image_id"] for hit in run(client.post("/search", json={"query": "a cup of coffee", "k": 3})).json()["results"]]
    for exclude in (first, first + ["removed-since.jpg"]):
        r = run(client.post("/search", json={"query": "a cup of coffee", "k": 3, "exclude": exclude}))
        assert r.status_code == 200, r.text
        expected = run(hf_engine.search("a cup of coffee", 3, 3, exclude=frozenset(first)))
        assert [hit["image_id"] for hit in r.json()["results"]] == [h.key for h in expected]
        assert len(expected) == 3 and not {h.key for h in expected} & set(first)
    r = run(client.post("/search", json={"query": "a cup of coffee", "exclude": []}))  # nothing left out: page one
    assert [hit["image_id"] for hit in r.json()["results"]] == first
    big = Served(run, create_app(Settings(**{**SETTINGS, "max_exclude": 100}), engine=hf_engine))
    try:
        r = run(big.client.post("/search", json={"query": "a dog", "exclude": tiny_catalog.keys()}))
        assert r.status_code == 422 and r.json()["detail"] == (
            f"exclude leaves out all {len(tiny_catalog)} of the model's images: none to search")
    finally:
        big.close()


def test_default_k_and_the_image_urls_serve_the_catalog_files(run, client, tiny_catalog):
    results = run(client.post("/search", json={"query": "a cup of coffee"})).json()["results"]
    assert len(results) == SETTINGS["default_k"]
    image = run(client.get(urlsplit(results[0]["url"]).path))
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == tiny_catalog[results[0]["image_id"]].path.read_bytes()


def test_describe_and_ask_answer_from_the_id(run, client, hf_engine):
    r = run(client.post("/describe/rocket.jpg"))
    assert r.status_code == 200, r.text
    assert r.json()["image_id"] == "rocket.jpg"
    assert r.json()["description"] == run(hf_engine.describe("rocket.jpg")) != ""
    r = run(client.post("/ask", json={"image_id": "moon.jpg", "question": "  What is in this image? "}))
    assert r.status_code == 200, r.text
    assert r.json()["question"] == "What is in this image?"
    assert r.json()["answer"] == run(hf_engine.ask("moon.jpg", "What is in this image?")).text != ""
    assert r.json()["yes_probability"] is None  # not a yes/no answer


def test_a_yes_or_no_answer_says_how_far_the_model_leaned(run, client, hf_engine):
    from genret.training import presence_question

    said = []
    for key, word in (("moon.jpg", "moon"), ("moon.jpg", "rocket"), ("rocket.jpg", "rocket"), ("rocket.jpg", "cat")):
        r = run(client.post("/ask", json={"image_id": key, "question": presence_question(word)}))
        assert r.status_code == 200, r.text
        body, expected = r.json(), run(hf_engine.ask(key, presence_question(word)))
        assert (body["answer"], body["yes_probability"]) == (expected.text, expected.yes_probability)
        if expected.is_yes_or_no:
            said.append(body)
            assert 0 < body["yes_probability"] < 1
            assert (body["yes_probability"] > 0.5) == body["answer"].startswith("Yes")
    assert said, "the tiny model answered no presence question with yes or no"


def test_a_model_trained_without_describe_and_ask_refuses_them_with_409(run, tiny_catalog, tmp_path, capsys):
    """Untrained, the LM would still write something about an id it never learnt to speak of."""
    from genret.cli import main
    from genret.training import TrainConfig, Trainer
    from tests.conftest import TINY_CONFIG

    catalog = tiny_catalog.subset(tiny_catalog.keys()[:4])
    config = TrainConfig(**{**TINY_CONFIG, "memorize_epochs": 1, "retrieve_epochs": 1, "align_epochs": 2,
                            "describe": False, "ask": False})
    Trainer(catalog, config, tmp_path / "run", progress=False).train(tmp_path / "model")
    key = catalog.keys()[0]
    served = Served(run, create_app(Settings(**SETTINGS, model=str(tmp_path / "model"), engine="transformers")))
    try:
        assert run(served.client.get("/readyz")).json()["tasks"] == ["search"]
        assert run(served.client.post("/search", json={"query": "a cat"})).status_code == 200
        for r, task in [(run(served.client.post(f"/describe/{key}")), "describe"),
                        (run(served.client.post("/ask", json={"image_id": key, "question": "What is it?"})), "ask")]:
            assert r.status_code == 409
            assert r.json()["detail"] == (f"model 'model' was not trained to {task} (its training config has "
                                          f"{task}=false): retrain it without --set {task}=false")
    finally:
        served.close()
    assert main(["describe", str(tmp_path / "model"), key]) == 2
    assert "genret describe: model 'model' was not trained to describe" in capsys.readouterr().err
    assert main(["ask", str(tmp_path / "model"), key, "What is it?"]) == 2
    assert "genret ask: model 'model' was not trained to ask" in capsys.readouterr().err


@pytest.mark.parametrize("method,path,body", [
    ("post", "/describe/no-such.jpg", None),
    ("post", "/ask", {"image_id": "no-such.jpg", "question": "what?"}),
    ("get", "/images/no-such.jpg", None),
])
def test_unknown_image_is_404_with_a_reason(run, client, method, path, body):
    r = run(getattr(client, method)(path, **({"json": body} if body else {})))
    assert r.status_code == 404
    assert "no-such.jpg" in r.json()["detail"] or "no image" in r.json()["detail"]


BAD_REQUESTS = [
    ("/search", {"query": ""}, "at least 1 character"),
    ("/search", {"query": "   \n "}, "at least 1 character"),
    ("/search", {"query": "x" * (MAX_CHARS + 1)}, f"at most {MAX_CHARS} characters"),
    ("/search", {"query": "a dog", "k": 0}, "greater than or equal to 1"),
    ("/search", {"query": "a dog", "k": MAX_K + 1}, f"less than or equal to {MAX_K}"),
    ("/search", {"query": "a dog", "k": "many"}, "valid integer"),
    ("/search", {"query": "a dog", "k": 2.5}, "valid integer"),
    ("/search", {"query": "a dog", "k": True}, "valid integer"),
    ("/search", {"query": "a dog", "k": "3"}, "valid integer"),
    ("/search", {"query": None}, "valid string"),
    ("/search", {"k": 3}, "Field required"),
    ("/search", {"query": "a dog", "beams": 3}, "Extra inputs"),
    ("/search", {"query": "a dog", "within": []}, "at least 1 item"),
    ("/search", {"query": "a dog", "within": ["moon.jpg"] * (MAX_WITHIN + 1)}, f"at most {MAX_WITHIN} items"),
    ("/search", {"query": "a dog", "within": "moon.jpg"}, "valid list"),
    ("/search", {"query": "a dog", "within": [""]}, "at least 1 character"),
    ("/search", {"query": "a dog", "within": [3]}, "valid string"),
    ("/search", {"query": "a dog", "within": ["moon.jpg", "nope.jpg"]},
     "within: 1 of its 2 image ids are not in model"),
    ("/search", {"query": "a dog", "within": ["moon.jpg", "nope.jpg"]}, "e.g. ['nope.jpg']"),
    ("/search", {"query": "a dog", "exclude": ["moon.jpg"] * (MAX_EXCLUDE + 1)}, f"at most {MAX_EXCLUDE} items"),
    ("/search", {"query": "a dog", "exclude": "moon.jpg"}, "valid list"),
    ("/search", {"query": "a dog", "exclude": [None]}, "valid string"),
    ("/search", {"query": "a dog", "within": ["moon.jpg", "coins.jpg"], "exclude": ["coins.jpg", "moon.jpg"]},
     "exclude leaves out all 2 of the within list's images"),
    ("/search", [], "valid dictionary"),
    ("/search", "a dog", "valid dictionary"),
    ("/search", {"query": "\u0000\u0001"}, "no visible characters"),  # was searched, with confident scores
    ("/search", {"query": " \u200b\u2060\ufeff "}, "no visible characters"),  # zero-width space, joiner, BOM
    ("/ask", {"image_id": "moon.jpg", "question": ""}, "at least 1 character"),
    ("/ask", {"image_id": "moon.jpg", "question": "\u200b"}, "no visible characters"),
    ("/ask", {"image_id": "", "question": "why?"}, "at least 1 character"),
    ("/ask", {"question": "why?"}, "Field required"),
]


@pytest.mark.parametrize("path,body,reason", BAD_REQUESTS)
def test_bad_requests_are_422_with_a_reason(run, client, path, body, reason):
    r = run(client.post(path, json=body))
    assert r.status_code == 422, r.text
    assert reason in r.text


@pytest.mark.parametrize("content,headers", [
    (b'{"query": "a dog", "k": ', {"content-type": "application/json"}),
    (b"\xff\xfe not json", {"content-type": "application/json"}),
    (b"", {"content-type": "application/json"}),
    (b"query=a+dog", {"content-type": "application/x-www-form-urlencoded"}),
])
def test_malformed_bodies_are_4xx_never_500(run, client, content, headers):
    r = run(client.post("/search", content=content, headers=headers))
    assert r.status_code in (400, 422), r.text  # 400: a body that is not even UTF-8
    assert r.json()["detail"]


@pytest.mark.parametrize("path,content", [
    ("/search", b'{"query": "a \\ud800 dog"}'),
    ("/ask", b'{"image_id": "moon.jpg", "question": "is it \\udfff?"}'),
    ("/ask", b'{"image_id": "\\ud800", "question": "why?"}'),
])
def test_a_lone_surrogate_is_422_with_a_reason(run, client, path, content):
    """Valid JSON, yet no string: the error that echoes it back must still be writable."""
    r = run(client.post(path, content=content, headers={"content-type": "application/json"}))
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert "unicode" in error["msg"] and {"\ud800", "\udfff"} & set(error["input"])


def test_a_request_over_the_time_limit_is_504(run, hf_engine):
    slow = Served(run, create_app(Settings(**SETTINGS, request_timeout_s=0.001), engine=hf_engine))
    try:
        r = run(slow.client.post("/search", json={"query": "a horse in a field", "k": 8}))
        assert r.status_code == 504 and "longer than" in r.json()["detail"]
        assert run(slow.client.get("/healthz")).status_code == 200
    finally:
        slow.close()


def test_before_the_engine_is_loaded_it_is_alive_but_not_ready(run, tiny_model_dir):
    import httpx

    # No lifespan: the engine never starts, which is how a server looks while vLLM loads.
    app = create_app(Settings(**SETTINGS), engine=HFEngine(StoredModel.open(tiny_model_dir), device="cpu"))

    async def probe():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return [await c.get("/healthz"), await c.get("/readyz"), await c.post("/search", json={"query": "a"}),
                    await c.post("/describe/moon.jpg")]

    health, ready, search, describe = run(probe())
    assert health.status_code == 200
    assert ready.status_code == 503 and "loading" in ready.json()["reason"]
    assert search.status_code == describe.status_code == 503 and "loading" in search.json()["detail"]


def search_served(run, settings: Settings, engine, query: str, k: int) -> list[dict]:
    """The results of one POST /search to an app served with these settings on this engine."""
    served = Served(run, create_app(settings, engine=engine))
    try:
        r = run(served.client.post("/search", json={"query": query, "k": k}))
        assert r.status_code == 200, r.text
        return r.json()["results"]
    finally:
        served.close()


@pytest.mark.parametrize("weight, hubness_weight", [(1000.0, 0.0), (0.0, 1e6)])
def test_rerank_weights_reorder_a_wider_beam_by_the_two_tower(run, hf_engine, tiny_catalog, weight, hubness_weight):
    from genret.decoding import EmbeddingReranker

    query, beams = "an animal in a field", 20  # a wider beam than the 8-image catalog
    results = search_served(run, Settings(**SETTINGS, rerank_weight=weight, hubness_weight=hubness_weight,
                                          rerank_beams=beams), hf_engine, query, k=3)
    plain = run(hf_engine.search(query, beams, beams))
    reranker = EmbeddingReranker(hf_engine.stored, weight, hubness_weight=hubness_weight)
    [expected] = reranker([query], [plain])
    assert [hit["image_id"] for hit in results] == [h.key for h in expected[:3]]
    assert [hit["score"] for hit in results] == pytest.approx([h.score for h in expected[:3]])
    if hubness_weight:  # so large that the least hub-like images come first
        [hubness] = reranker.hubness([plain])
        least = sorted(zip(hubness, plain), key=lambda pair: pair[0])[:3]
        assert [hit["image_id"] for hit in results] == [h.key for _, h in least]


def test_beam_hubness_weight_searches_by_the_prior(run, hf_engine):
    """GENRET_BEAM_HUBNESS_WEIGHT steers the search itself: the service's narrow beam (3) returns
    what the reference decoder returns with the model's hubness prior, scores included."""
    from genret.decoding import PriorWeights, search_prior

    query = "an animal in a field"
    results = search_served(run, Settings(**SETTINGS, beam_hubness_weight=20.0), hf_engine, query, k=3)
    [expected] = hf_engine.engine.search([query], k=3, beams=SETTINGS["beams"],
                                         prior=search_prior(hf_engine.stored, PriorWeights(hubness=20.0)))
    assert [hit["image_id"] for hit in results] == [h.key for h in expected]
    assert [hit["score"] for hit in results] == pytest.approx([h.score for h in expected])
    assert expected != run(hf_engine.search(query, 3, SETTINGS["beams"]))
    for bad in (-1, float("inf"), float("nan")):  # a prior the search would refuse stops the server at startup
        with pytest.raises(ValidationError, match="beam_hubness_weight"):
            Settings(beam_hubness_weight=bad)
    with pytest.raises(ValueError, match="hubness must be a finite number >= 0"):
        run(hf_engine.search(query, 3, SETTINGS["beams"], prior=PriorWeights(hubness=-1.0)))


def test_rerank_weight_on_a_model_without_a_two_tower_fails_at_startup(tiny_model_dir, tmp_path):
    from genret.decoding import EmbeddingReranker
    from genret.model_store import ModelStoreError

    for name in ("manifest.json", "catalog.json", "identifiers.json"):  # a model folder without the two-tower
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(ModelStoreError, match=r"GENRET_RERANK_WEIGHT=5, GENRET_HUBNESS_WEIGHT=0\) needs the model.s alignment"):
        create_app(Settings(model=str(tmp_path), engine="transformers", rerank_weight=5))
    with pytest.raises(ModelStoreError, match="cannot re-rank"):  # the CLI's --rerank, too: an error, not a crash
        EmbeddingReranker(StoredModel.open(tmp_path))
    with pytest.raises(ValidationError, match="rerank_weight"):
        Settings(rerank_weight=-1)
    with pytest.raises(ValidationError, match="hubness_weight"):
        Settings(hubness_weight=-1)


def test_hubness_weight_on_a_model_without_image_hubness_fails_at_startup(tiny_model_dir, tmp_path):
    from genret.decoding import EmbeddingReranker, PriorWeights, search_prior
    from genret.model_store import ModelStoreError

    older = tmp_path / "older"  # a model saved before image_hubness.npy existed
    shutil.copytree(tiny_model_dir, older)
    (older / "image_hubness.npy").unlink()
    with pytest.raises(ModelStoreError, match="GENRET_HUBNESS_WEIGHT=50 needs the model's image_hubness.npy"):
        create_app(Settings(model=str(older), engine="transformers", hubness_weight=50))
    with pytest.raises(ModelStoreError, match="GENRET_BEAM_HUBNESS_WEIGHT=5 needs the model's image_hubness.npy"):
        create_app(Settings(model=str(older), engine="transformers", beam_hubness_weight=5))
    with pytest.raises(ModelStoreError, match="lacks image_hubness.npy"):
        search_prior(StoredModel.open(older), PriorWeights(hubness=5))
    with pytest.raises(ModelStoreError, match="lacks image_hubness.npy"):
        EmbeddingReranker(StoredModel.open(older), hubness_weight=50)
    assert EmbeddingReranker(StoredModel.open(older), weight=5).image_hubness is None  # re-ranking alone still works


def test_images_that_moved_are_served_from_images_dir(run, tiny_model_dir, tmp_path):
    """A container mounts the catalog's images somewhere else than where training found them:
    catalog.json holds paths relative to the recorded images_root, and GENRET_IMAGES_DIR re-roots them."""
    import json

    import httpx

    records = json.loads((tiny_model_dir / "catalog.json").read_text())
    assert records and not any(Path(r["path"]).is_absolute() for r in records)
    stored = StoredModel.open(tiny_model_dir)
    assert all(image.path.is_file() for image in stored.catalog)  # under the manifest's images_root
    mounted = tmp_path / "mounted"
    originals = [image.path for image in stored.catalog]
    for record, source in zip(records, originals[1:] + originals[:1]):  # each key now holds another image
        (mounted / record["path"]).parent.mkdir(parents=True, exist_ok=True)
        (mounted / record["path"]).write_bytes(source.read_bytes())
    app = create_app(Settings(**SETTINGS, model=str(tiny_model_dir), images_dir=mounted, engine="transformers",
                              device="cpu"))

    async def fetch(key):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get(f"/images/{key}")

    key = records[0]["key"]
    served = run(fetch(key))
    assert served.status_code == 200
    assert served.content == (mounted / records[0]["path"]).read_bytes() != stored.catalog[key].path.read_bytes()


def test_metrics_count_requests_per_endpoint(run, client):
    run(client.post("/search", json={"query": "coins", "k": 2}))
    run(client.post("/search", json={"query": ""}))
    run(client.post("/describe/nope.jpg"))
    text = run(client.get("/metrics")).text

    def value(pattern):
        match = re.search("^" + pattern + r" (\S+)$", text, re.M)
        assert match, f"{pattern} not in /metrics"
        return float(match.group(1))

    assert value(r'genret_requests_total\{endpoint="/search",method="POST",status="200"\}') >= 1
    assert value(r'genret_requests_total\{endpoint="/search",method="POST",status="422"\}') >= 1
    assert value(r'genret_requests_total\{endpoint="/describe/\{image_id:path\}",method="POST",status="404"\}') >= 1
    assert value(r'genret_request_seconds_count\{endpoint="/search"\}') >= 2
    assert value(r"genret_engine_queue_depth") == 0
    assert "/docs" in run(client.get("/")).text and run(client.get("/openapi.json")).status_code == 200


words = st.lists(st.sampled_from("a the dog red sky moon of zebra 42 ü ??? space coffee cat # \n {} ".split(" ")),
                 min_size=1, max_size=12)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=words.map(" ".join), k=st.integers(1, MAX_K))
def test_random_queries_only_ever_return_catalog_ids(run, client, tiny_catalog, query, k):
    r = run(client.post("/search", json={"query": query, "k": k}))
    if not query.strip():
        assert r.status_code == 422
        return
    assert r.status_code == 200, r.text
    keys = [hit["image_id"] for hit in r.json()["results"]]
    assert 1 <= len(keys) <= k and len(set(keys)) == len(keys)
    assert set(keys) <= set(tiny_catalog.keys())


def test_settings_come_from_the_environment_typed(monkeypatch, tmp_path):
    monkeypatch.setenv("GENRET_MAX_K", "17")
    monkeypatch.setenv("GENRET_REDIS_URL", "redis://example:6379/1")
    monkeypatch.setenv("GENRET_MODEL", str(tmp_path))
    s = Settings()
    assert (s.max_k, s.redis_url, s.model_path) == (17, "redis://example:6379/1", tmp_path)
    assert Settings(model="demo").model_path == s.model_store / "demo"
    monkeypatch.setenv("GENRET_MAX_K", "lots")
    with pytest.raises(ValidationError, match="max_k"):
        Settings()
    monkeypatch.delenv("GENRET_MAX_K")
    monkeypatch.setenv("GENRET_ID_STORE_NAMESPACE", "my catalog")
    with pytest.raises(ValidationError, match="id_store_namespace"):
        Settings()


def test_an_api_key_guards_search_describe_and_ask_and_cors_lets_the_named_origins_call(
        run, hf_engine, monkeypatch, tiny_catalog):
    monkeypatch.setenv("GENRET_API_KEY", "s3cret-key")
    monkeypatch.setenv("GENRET_CORS_ORIGINS", "https://search.example.com, https://admin.example.com")
    settings = Settings(**SETTINGS)
    assert settings.cors_origins == ["https://search.example.com", "https://admin.example.com"]
    assert "s3cret" not in repr(settings)  # a logged settings object does not give the key away
    served = Served(run, create_app(settings, engine=hf_engine))
    try:
        client, key = served.client, {"Authorization": "Bearer s3cret-key"}
        calls = [("/search", {"query": "a rocket", "k": 2}), ("/describe/rocket.jpg", None),
                 ("/ask", {"image_id": "moon.jpg", "question": "What is this?"})]
        for path, body in calls:
            missing = run(client.post(path, json=body))
            assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer <key>" in missing.json()["detail"]
            wrong = run(client.post(path, json=body, headers={"Authorization": "Bearer s3cret-kez"}))
            assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong API key"
            assert run(client.post(path, json=body, headers=key)).status_code == 200
        # no key, no hint of what a request would have got: an unknown image and a bad body are 401 too
        assert run(client.post("/describe/nope.jpg")).status_code == 401
        assert run(client.post("/search", json={"k": "many"})).status_code == 401
        assert run(client.post("/describe/nope.jpg", headers=key)).status_code == 404
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", f"/images/{tiny_catalog.keys()[0]}"):
            assert run(client.get(path)).status_code == 200, path
        schemes = run(client.get("/openapi.json")).json()["components"]["securitySchemes"]
        assert list(schemes.values()) == [{"type": "http", "scheme": "bearer"}]  # the docs' Authorize button
        # a browser page on a named origin may call it (the preflight asks for the Authorization header)
        preflight = run(client.options("/search", headers={
            "Origin": "https://search.example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"}))
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://search.example.com"
        answered = run(client.post("/search", json={"query": "a rocket"},
                                   headers={**key, "Origin": "https://admin.example.com"}))
        assert answered.headers["access-control-allow-origin"] == "https://admin.example.com"
        other = run(client.post("/search", json={"query": "a rocket"}, headers={**key, "Origin": "https://evil.test"}))
        assert "access-control-allow-origin" not in other.headers
    finally:
        served.close()


def test_without_an_api_key_or_origins_the_api_is_open_and_sends_no_cors_headers(run, client):
    r = run(client.post("/search", json={"query": "a rocket"}, headers={"Origin": "https://search.example.com"}))
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert "securitySchemes" not in run(client.get("/openapi.json")).json().get("components", {})


def test_image_urls_follow_the_port_unless_a_public_url_is_set(monkeypatch):
    """`GENRET_PORT=8080 scripts/run` (the README's example) handed out URLs on port 8000."""
    monkeypatch.setenv("GENRET_PORT", "8080")
    assert Settings().image_url("a b.jpg") == "http://localhost:8080/images/a%20b.jpg"
    assert Settings(host="0.0.0.0").public_url == "http://localhost:8080"
    assert Settings(host="10.1.2.3").public_url == "http://10.1.2.3:8080"
    assert Settings(host="fd00::7").public_url == "http://[fd00::7]:8080"
    monkeypatch.setenv("GENRET_PUBLIC_URL", "https://img.example.com/")
    assert Settings().image_url("a.jpg") == "https://img.example.com/images/a.jpg"


def test_a_missing_model_fails_at_startup_with_its_path(tmp_path):
    from genret.model_store import ModelStoreError

    with pytest.raises(ModelStoreError, match="not a trained model"):
        create_app(Settings(model=str(tmp_path), engine="transformers"))
