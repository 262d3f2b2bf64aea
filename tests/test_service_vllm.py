"""A real vLLM engine (one per module; ~1 min to start on a CPU) on the tiny model, over HTTP:
only catalog ids ever, the same results as the transformers engine, batching under load.

Deselect with `-m "not vllm"` on machines without vLLM (they skip anyway)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm")

from genret.decoding import PriorWeights  # noqa: E402
from genret.model_store import StoredModel  # noqa: E402
from service.app import create_app  # noqa: E402
from service.engine_vllm import VLLMEngine  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.conftest import MODEL_KINDS  # noqa: E402
from tests.service_helpers import Served, hf_engine, run  # noqa: E402,F401  (fixtures)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_MODEL_LEN = 512
SETTINGS = Settings(gpu_memory_utilization=0.15, max_model_len=MAX_MODEL_LEN, max_k=8, beams=3,
                    public_url="http://img.test")
QUERIES = ["a rocket at night", "an astronaut in an orange suit", "a cup of brown coffee", "a cat on a blanket",
           "old coins on a table", "the full moon", "a horse in a field", "a red motorcycle", "zebra 42 ü ???"]


@pytest.fixture(scope="module", params=list(MODEL_KINDS))
def stored(request):
    """Each kind of model: token prompts, prompts that start with the query prefix (sent to
    vLLM as prompt embeddings), and the training defaults (atomic ids, with the prefix)."""
    return StoredModel.open(request.getfixturevalue(MODEL_KINDS[request.param]))


@pytest.fixture(scope="module")
def vllm_engine(run, stored):
    engine = VLLMEngine(stored, SETTINGS)
    run(engine.start())
    yield engine
    run(engine.close())


@pytest.fixture(scope="module")
def client(run, vllm_engine):
    served = Served(run, create_app(SETTINGS, engine=vllm_engine))
    yield served.client
    served.close()


def test_search_over_http(run, client, tiny_catalog):
    assert run(client.get("/readyz")).json()["engine"] == "vllm"
    r = run(client.post("/search", json={"query": "an astronaut in an orange suit", "k": 5}))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    keys = [hit["image_id"] for hit in results]
    assert len(keys) == len(set(keys)) == 5 and set(keys) <= set(tiny_catalog.keys())
    assert [hit["score"] for hit in results] == sorted((hit["score"] for hit in results), reverse=True)
    assert all(hit["url"] == f"http://img.test/images/{hit['image_id']}" for hit in results)


def test_greedy_top1_is_the_transformers_engines(run, vllm_engine, hf_engine):
    for query in QUERIES:
        [v] = run(vllm_engine.search(query, k=1, beams=1))
        [h] = run(hf_engine.search(query, k=1, beams=1))
        assert v.key == h.key, query
        assert v.score == pytest.approx(h.score, abs=1e-3)


@pytest.mark.parametrize("k,beams", [(3, 3), (5, 5), (8, 10)])
def test_top_k_beam_search_is_the_transformers_engines(run, vllm_engine, hf_engine, k, beams):
    for query in QUERIES:
        v = run(vllm_engine.search(query, k=k, beams=beams))
        h = run(hf_engine.search(query, k=k, beams=beams))
        assert [x.key for x in v] == [x.key for x in h], query
        assert [x.score for x in v] == pytest.approx([x.score for x in h], abs=1e-3)


def test_a_hubness_prior_searches_as_in_the_transformers_engine(run, vllm_engine, hf_engine):
    for query in QUERIES:
        for k, beams in ((1, 1), (3, 3)):
            v = run(vllm_engine.search(query, k=k, beams=beams, prior=PriorWeights(hubness=2.0)))
            h = run(hf_engine.search(query, k=k, beams=beams, prior=PriorWeights(hubness=2.0)))
            assert [x.key for x in v] == [x.key for x in h], query
            assert [x.score for x in v] == pytest.approx([x.score for x in h], abs=1e-3)


WITHIN = frozenset({"moon.jpg", "coins.jpg", "rocket.jpg", "coffee.jpg", "horse.jpg"})


def test_a_search_within_some_images_is_the_transformers_engines(run, vllm_engine, hf_engine):
    """Each step names the tokens the images' own trie allows, with their prior offsets; vLLM's
    worker, which holds only the catalog's trie, keeps those alone."""
    for query in QUERIES:
        for prior in (PriorWeights(), PriorWeights(hubness=2.0)):
            for k, beams in ((1, 1), (3, 3), (5, 8)):
                v = run(vllm_engine.search(query, k=k, beams=beams, prior=prior, within=WITHIN))
                h = run(hf_engine.search(query, k=k, beams=beams, prior=prior, within=WITHIN))
                assert [x.key for x in v] == [x.key for x in h], (query, prior, k)
                assert [x.score for x in v] == pytest.approx([x.score for x in h], abs=1e-3)
                assert {x.key for x in v} <= WITHIN


def test_a_search_within_some_images_over_http(run, client):
    r = run(client.post("/search", json={"query": "a horse in a field", "k": 8, "within": sorted(WITHIN)}))
    assert r.status_code == 200, r.text
    assert {hit["image_id"] for hit in r.json()["results"]} == WITHIN
    r = run(client.post("/search", json={"query": "a horse in a field", "within": ["moon.jpg", "mars.jpg"]}))
    assert r.status_code == 422 and "['mars.jpg']" in r.json()["detail"]


def test_a_search_that_leaves_images_out_is_the_transformers_engines(run, vllm_engine, hf_engine):
    """Each step whose prefix leads to a left-out image names the tokens that lead to those alone
    (or, where the prior's offsets change, what the rest allows); elsewhere it is the catalog's."""
    for query in QUERIES:
        for prior in (PriorWeights(), PriorWeights(hubness=2.0)):
            exclude = frozenset(h.key for h in run(hf_engine.search(query, k=3, beams=3, prior=prior)))
            for k, beams, within in ((1, 1, None), (3, 3, None), (5, 8, None), (3, 4, WITHIN)):
                v = run(vllm_engine.search(query, k=k, beams=beams, prior=prior, within=within, exclude=exclude))
                h = run(hf_engine.search(query, k=k, beams=beams, prior=prior, within=within, exclude=exclude))
                assert [x.key for x in v] == [x.key for x in h], (query, prior, k, within)
                assert [x.score for x in v] == pytest.approx([x.score for x in h], abs=1e-3)
                assert not {x.key for x in v} & exclude


def test_the_next_page_of_a_search_over_http_leaves_the_first_out(run, client, tiny_catalog):
    query = {"query": "a horse in a field", "k": 4}
    first = [hit["image_id"] for hit in run(client.post("/search", json=query)).json()["results"]]
    r = run(client.post("/search", json={**query, "exclude": first + ["removed-since.jpg"]}))
    assert r.status_code == 200, r.text
    second = [hit["image_id"] for hit in r.json()["results"]]
    assert len(second) == 4 and not set(first) & set(second)
    r = run(client.post("/search", json={**query, "exclude": tiny_catalog.keys()}))
    assert r.status_code == 422 and "leaves out all" in r.json()["detail"]
    r = run(client.post("/search", json={**query, "within": ["moon.jpg"], "exclude": ["moon.jpg"]}))
    assert r.status_code == 422 and "within list" in r.json()["detail"]


words = st.lists(st.sampled_from("a the dog red sky moon of zebra 42 ü ??? space coffee cat # \n".split(" ")),
                 min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=words.map(" ".join), k=st.integers(1, 8), beams=st.integers(1, 10))
def test_random_queries_only_ever_return_catalog_ids(run, vllm_engine, tiny_catalog, query, k, beams):
    hits = run(vllm_engine.search(query, k=k, beams=beams))
    assert 1 <= len(hits) <= k
    assert len({h.key for h in hits}) == len(hits)
    assert all(h.key in tiny_catalog for h in hits)


def test_concurrent_requests_batch_and_agree_with_sequential_ones(run, client, vllm_engine):
    bodies = [{"query": q, "k": k} for q in QUERIES for k in (1, 4)]
    sequential = [run(client.post("/search", json=b)).json()["results"] for b in bodies]

    async def together():
        depth = []

        async def watch():
            while True:
                depth.append(vllm_engine.queue_depth)
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.gather(*(client.post("/search", json=b) for b in bodies)), max(depth)
        finally:
            watcher.cancel()

    responses, most_in_flight = run(together())
    assert [r.status_code for r in responses] == [200] * len(bodies)
    for response, alone in zip(responses, sequential):
        together_ = response.json()["results"]
        assert [h["image_id"] for h in together_] == [h["image_id"] for h in alone]
        assert [h["score"] for h in together_] == pytest.approx([h["score"] for h in alone], abs=1e-4)
    assert most_in_flight > len(QUERIES), "the engine never had the concurrent searches' steps in flight together"


def test_each_beam_step_is_one_request_whatever_the_nodes_width(run, vllm_engine):
    """The trie runs inside vLLM (service.vllm_trie_mask): a beam's step is one request for its
    best next tokens, never one per slice of a wide node. (benchmarks/vllm_search.py, and its
    test, grow a catalog to hundreds of atomic ids at the root.)"""
    requests, generate = [], vllm_engine._generate

    async def counted(*args, **kwargs):
        requests.append(args[1])
        return await generate(*args, **kwargs)

    vllm_engine._generate = counted
    try:
        hits = run(vllm_engine.search("a horse in a field", k=3, beams=3))
    finally:
        vllm_engine._generate = generate
    depth, width = vllm_engine.trie.max_depth(), len(vllm_engine.trie.first_tokens)
    assert len(hits) == 3 and 1 < len(requests) <= 1 + 3 * (depth - 1)
    assert requests[0].logprobs == min(6, width) and requests[0].extra_args["genret_trie_step"]["prefix"] == []


def test_vllm_runs_its_v1_model_runner_which_takes_the_trie_processor(vllm_engine):
    import os

    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"


def test_a_hubness_weight_vllms_worker_could_not_use_is_refused_before_it_is_sent(run, vllm_engine, tmp_path):
    import shutil

    from genret.model_store import ModelStoreError

    with pytest.raises(ValueError, match="hubness must be a finite number >= 0"):
        run(vllm_engine.search("a horse in a field", k=3, beams=3, prior=PriorWeights(hubness=-1.0)))
    older = shutil.copytree(vllm_engine.stored.path, tmp_path / "model")  # a model from before image_hubness.npy
    (older / "image_hubness.npy").unlink(missing_ok=True)
    with pytest.raises(ModelStoreError, match="image_hubness"):
        run(VLLMEngine(StoredModel.open(older), SETTINGS).search("a horse in a field", k=3, beams=3,
                                                                 prior=PriorWeights(hubness=2.0)))


def test_a_malformed_trie_step_is_refused_by_vllm(run, vllm_engine):
    from vllm import SamplingParams

    from service.vllm_trie_mask import STEP

    for step in ({"prefix": "nope", "hubness_weight": 0},
                 {"prefix": [], "hubness_weight": 0, "added_bonus": 0, "allowed": []},
                 {"prefix": [], "hubness_weight": 0, "added_bonus": 0, "allowed": [5, 6], "offsets": [0.0]},
                 {"prefix": [], "hubness_weight": 0, "added_bonus": 0, "forbidden": 5},
                 {"prefix": [], "hubness_weight": 0, "added_bonus": 0, "allowed": [5], "offsets": None,
                  "forbidden": [6]}):
        params = SamplingParams(max_tokens=1, logprobs=2, extra_args={STEP: step})
        with pytest.raises(Exception, match="prefix"):
            run(vllm_engine._generate(vllm_engine.prompts.retrieve("a horse"), params))


def test_describe_and_ask_match_the_transformers_engine(run, client, hf_engine):
    r = run(client.post("/describe/rocket.jpg"))
    assert r.status_code == 200, r.text
    assert r.json()["description"] == run(hf_engine.describe("rocket.jpg"))
    r = run(client.post("/ask", json={"image_id": "coffee.jpg", "question": "What is in this image?"}))
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == run(hf_engine.ask("coffee.jpg", "What is in this image?")).text
    assert run(client.post("/describe/unknown.jpg")).status_code == 404


def test_a_yes_or_no_answer_leans_as_the_transformers_engine_says(run, client, hf_engine):
    """vLLM returns the first answer token's logits of Yes and No (logprob_token_ids), whose
    difference is the log-odds transformers reads off its own generation."""
    from genret.training import presence_question

    said = 0
    for key, word in (("rocket.jpg", "rocket"), ("rocket.jpg", "cup"), ("coffee.jpg", "cup"), ("coffee.jpg", "moon")):
        r = run(client.post("/ask", json={"image_id": key, "question": presence_question(word)}))
        assert r.status_code == 200, r.text
        expected = run(hf_engine.ask(key, presence_question(word)))
        assert r.json()["answer"] == expected.text
        if expected.is_yes_or_no:
            said += 1
            assert r.json()["yes_probability"] == pytest.approx(expected.yes_probability, abs=1e-3)
        else:
            assert r.json()["yes_probability"] is None
    assert said, "the tiny model answered no presence question with yes or no"


def test_a_model_that_asks_from_its_description_is_asked_so_by_both_engines(run, client, hf_engine, stored,
                                                                             monkeypatch):
    monkeypatch.setitem(stored.manifest["train_config"], "ask_from_description", True)  # both engines read it
    question = "Is there a rocket in this image?"
    r = run(client.post("/ask", json={"image_id": "rocket.jpg", "question": question}))
    assert r.status_code == 200, r.text
    described = run(hf_engine.describe("rocket.jpg"))
    prompt = hf_engine.engine.prompts.ask(stored.id_tokens["rocket.jpg"], question, described)
    assert r.json()["answer"] == run(hf_engine.ask("rocket.jpg", question)).text
    assert r.json()["answer"] == hf_engine.engine.generate([prompt])[0]


def test_a_model_that_asks_after_several_descriptions_gets_the_same_beams_from_both_engines(
        run, client, vllm_engine, hf_engine, stored, monkeypatch):
    """vLLM has no beam search over its async engine: VLLMEngine.beam_search runs it, as for ids,
    and must find transformers' beams (summed log-probabilities, the same bookkeeping)."""
    for field, value in (("ask_from_description", True), ("ask_descriptions", 3)):
        monkeypatch.setitem(stored.manifest["train_config"], field, value)  # both engines read it
    question = "Is there a rocket in this image?"
    for key in ("rocket.jpg", "coffee.jpg", "moon.jpg"):
        [beams] = hf_engine.engine.generate_beams([hf_engine.engine.prompts.describe(stored.id_tokens[key])], 3,
                                                  max_new_tokens=SETTINGS.max_answer_tokens)
        assert run(vllm_engine.descriptions(key, 3)) == beams, key
    r = run(client.post("/ask", json={"image_id": "rocket.jpg", "question": question}))
    assert r.status_code == 200, r.text
    [context] = hf_engine.engine.ask_contexts(["rocket.jpg"])  # its three best descriptions, joined
    prompt = hf_engine.engine.prompts.ask(stored.id_tokens["rocket.jpg"], question, context)
    assert r.json()["answer"] == run(hf_engine.ask("rocket.jpg", question)).text
    assert r.json()["answer"] == hf_engine.engine.generate([prompt])[0]


def test_a_prompt_longer_than_the_context_is_422(run, client, vllm_engine):
    query = " ".join(f"w{i}ü" for i in range(150))  # under max_query_chars, over max_model_len in tokens
    assert len(vllm_engine.prompts.retrieve(query)) > MAX_MODEL_LEN
    r = run(client.post("/search", json={"query": query, "k": 2}))
    assert r.status_code == 422 and "max_model_len" in r.json()["detail"]
    assert run(client.post("/search", json={"query": "a horse", "k": 2})).status_code == 200


def test_metrics_include_the_engine_queue(run, client):
    text = run(client.get("/metrics")).text
    assert "genret_engine_queue_depth 0.0" in text
    assert 'genret_requests_total{endpoint="/search",method="POST",status="200"}' in text
