"""The core promise on a real (tiny) model: it memorizes its catalog and retrieves only real ids."""

from __future__ import annotations

import gc
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genret.decoding import EmbeddingReranker, Hit, PriorWeights, TransformersEngine, reranked, search_prior
from genret.evaluation import evaluate_describe_and_ask, evaluate_generative, recall, word_f1
from genret.model_store import StoredModel

from .conftest import MODEL_KINDS


@pytest.fixture(scope="module", params=list(MODEL_KINDS))
def engine(request):
    model_dir = request.getfixturevalue(MODEL_KINDS[request.param])
    return TransformersEngine(StoredModel.open(model_dir), device="cpu")


def test_training_captions_retrieve_their_own_image(engine, tiny_catalog):
    queries = [(c, img.key) for img in tiny_catalog for c in img.captions]
    hits = []
    for start in range(0, len(queries), 20):
        hits += engine.search([q for q, _ in queries[start : start + 20]], k=5, beams=5)
    scores = recall([[h.key for h in row] for row in hits], [t for _, t in queries], ks=(1, 5))
    assert scores["R@1"] >= 0.9, scores


def test_results_are_ranked_unique_catalog_images(engine, tiny_catalog):
    [hits] = engine.search(["a cat lying on a blanket"], k=5, beams=5)
    keys = [h.key for h in hits]
    assert len(keys) == len(set(keys)) == 5
    assert set(keys) <= set(tiny_catalog.keys())
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


words = st.lists(st.sampled_from("a the dog red sky moon of zebra 42 ü ??? space coffee cat #".split()), max_size=12)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=words.map(" ".join), k=st.integers(1, 8))
def test_random_queries_never_yield_an_id_outside_the_catalog(engine, tiny_catalog, query, k):
    if not query.strip():  # refused, as the CLI and the service refuse it
        with pytest.raises(ValueError, match="blank"):
            engine.search([query], k=k, beams=k)
        return
    [hits] = engine.search([query], k=k, beams=k)
    assert 1 <= len(hits) <= k
    assert all(h.key in tiny_catalog for h in hits)


def test_a_subset_trie_only_returns_that_subset(engine, tiny_catalog):
    subset = random.Random(0).sample(tiny_catalog.keys(), 3)
    [hits] = engine.search(["a photo"], k=10, beams=10, trie=engine.stored.trie(subset))
    assert {h.key for h in hits} == set(subset)


def test_a_search_within_some_images_scores_them_as_the_whole_catalogs_search_does(engine, tiny_catalog):
    """With beams as wide as the catalog nothing is pruned, so the whole search scores every id
    exactly; within a few images, their ranking and scores are those, the rest left out, with a
    prior too (its offsets then lead the beam towards the best of these images alone)."""
    n, query = len(tiny_catalog), "a dog running on the grass"
    within = random.Random(1).sample(tiny_catalog.keys(), 4)
    for prior in (None, search_prior(engine.stored, PriorWeights(hubness=3.0))):
        [everything] = engine.search([query], k=n, beams=n, prior=prior)
        expected = [h for h in everything if h.key in within]
        [hits] = engine.search([query], k=n, beams=4, prior=prior, within=within)
        assert [h.key for h in hits] == [h.key for h in expected]
        assert [h.score for h in hits] == pytest.approx([h.score for h in expected], abs=1e-4)
        assert engine.search([query], k=2, beams=4, prior=prior, within=within) == [hits[:2]]
    [[alone]] = engine.search([query], k=3, within=[within[0]])  # k past the images there are
    assert alone.key == within[0]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), k=st.integers(1, 6), beams=st.integers(1, 6))
def test_a_search_within_some_images_returns_only_those(engine, tiny_catalog, data, k, beams):
    within = data.draw(st.sets(st.sampled_from(tiny_catalog.keys()), min_size=1))
    query = data.draw(st.sampled_from(["a photo", "the moon at night", "zebra 42 ü", "coins", "a red car ?"]))
    [hits] = engine.search([query], k=k, beams=beams, within=within)
    assert 1 <= len(hits) <= min(k, len(within)) and len({h.key for h in hits}) == len(hits)
    assert {h.key for h in hits} <= within


def test_a_search_within_images_the_model_lacks_says_which(engine, tiny_catalog):
    from genret.model_store import UnknownImage

    with pytest.raises(UnknownImage, match=r"2 of 3 image keys are not in model .*\['nope.jpg', 'zzz.jpg'\]"):
        engine.search(["a cat"], within=["zzz.jpg", "nope.jpg", tiny_catalog.keys()[0]])
    with pytest.raises(ValueError, match="no image keys"):
        engine.search(["a cat"], within=[])
    with pytest.raises(TypeError, match="not one string"):
        engine.search(["a cat"], within="moon.jpg")
    with pytest.raises(ValueError, match="not both"):
        engine.search(["a cat"], within=["moon.jpg"], trie=engine.trie)


def test_a_search_that_leaves_images_out_is_the_search_within_the_rest(engine, tiny_catalog):
    """Leaving images out (the last page's hits, say) searches the catalog's trie less their ids:
    the same hits and scores as searching within all the others, with a prior too, at any beam
    width; with within as well, within what is left of it."""
    keys = tiny_catalog.keys()
    query = "a dog running on the grass"
    for prior in (None, search_prior(engine.stored, PriorWeights(hubness=3.0))):
        [first_page] = engine.search([query], k=3, beams=3, prior=prior)
        exclude = [h.key for h in first_page]
        rest = [key for key in keys if key not in exclude]
        for k, beams in ((1, 1), (3, 3), (4, 6)):
            [hits] = engine.search([query], k=k, beams=beams, prior=prior, exclude=exclude)
            assert hits == engine.search([query], k=k, beams=beams, prior=prior, within=rest)[0]
            assert not {h.key for h in hits} & set(exclude) and len(hits) == k
        within = random.Random(2).sample(keys, 6)
        [hits] = engine.search([query], k=6, beams=6, prior=prior, within=within, exclude=exclude)
        left = [key for key in within if key not in exclude]
        assert hits == engine.search([query], k=6, beams=6, prior=prior, within=left)[0]
    assert engine.search([query], k=3, exclude=["not-in-the-model.jpg"]) == engine.search([query], k=3)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), k=st.integers(1, 6), beams=st.integers(1, 6))
def test_a_search_never_returns_an_image_it_leaves_out(engine, tiny_catalog, data, k, beams):
    keys = tiny_catalog.keys()
    exclude = data.draw(st.sets(st.sampled_from(keys), max_size=len(keys) - 1))
    query = data.draw(st.sampled_from(["a photo", "the moon at night", "zebra 42 ü", "coins", "a red car ?"]))
    [hits] = engine.search([query], k=k, beams=beams, exclude=exclude)
    assert 1 <= len(hits) <= min(k, len(keys) - len(exclude)) and len({h.key for h in hits}) == len(hits)
    assert not {h.key for h in hits} & exclude


def test_a_search_that_leaves_out_every_image_says_so(engine, tiny_catalog):
    keys = tiny_catalog.keys()
    with pytest.raises(ValueError, match=f"exclude leaves out all {len(keys)} images"):
        engine.search(["a cat"], exclude=keys)
    with pytest.raises(ValueError, match="exclude leaves out all 2 images searched within"):
        engine.search(["a cat"], within=keys[:2], exclude=keys[:3])
    with pytest.raises(TypeError, match="not one string"):
        engine.search(["a cat"], exclude="moon.jpg")
    with pytest.raises(ValueError, match="not both"):
        engine.search(["a cat"], exclude=["moon.jpg"], trie=engine.trie)


def test_mask_tensors_kept_across_searches_live_as_long_as_their_trie(engine, tiny_catalog):
    subset = engine.stored.trie(tiny_catalog.keys()[:3])
    first = engine.search(["a photo of the moon"], k=3, trie=subset)
    assert engine.mask_tensors(subset, None)  # filled by the search, and read by the next
    assert engine.search(["a photo of the moon"], k=3, trie=subset) == first
    kept = len(engine._mask_tensors)
    del subset
    gc.collect()
    assert len(engine._mask_tensors) == kept - 1


def test_a_prior_over_every_id_is_the_plain_ranking_plus_each_ids_offset(engine, tiny_catalog):
    """With a beam as wide as the catalog nothing is pruned, so searching by the prior ranks
    exactly as adding each id's offset to its plain score; the offset is -weight x hubness."""
    n, query = len(tiny_catalog), "a dog running on the grass"
    prior = search_prior(engine.stored, PriorWeights(hubness=3.0))
    [plain] = engine.search([query], k=n, beams=n)
    [biased] = engine.search([query], k=n, beams=n, prior=prior)
    hubness = dict(zip(engine.stored.catalog.keys(), engine.stored.image_hubness()))
    expected = sorted(((h.key, h.score - 3.0 * float(hubness[h.key])) for h in plain), key=lambda pair: -pair[1])
    assert [h.key for h in biased] == [key for key, _ in expected]
    assert [h.score for h in biased] == pytest.approx([score for _, score in expected], abs=1e-4)
    assert search_prior(engine.stored, PriorWeights(hubness=0.0)) is None


def test_a_prior_reaches_ids_a_narrow_beam_pruned(engine):
    """Re-ranking can only reorder what the beam kept; the prior steers the beam itself: so
    strong that even a greedy search returns the least hub-like image, with its offset in its score."""
    prior = search_prior(engine.stored, PriorWeights(hubness=1e4))
    keys, hubness = engine.stored.catalog.keys(), engine.stored.image_hubness()
    least, query = keys[int(hubness.argmin())], "a cat lying on a blanket"
    [[alone]] = engine.search([query], k=1, beams=1, trie=engine.stored.trie([least]))  # its plain score
    for beams in (1, 2):
        [hits] = engine.search([query], k=1, beams=beams, prior=prior)
        assert [h.key for h in hits] == [least]
        assert hits[0].score == pytest.approx(alone.score - 1e4 * float(hubness.min()), abs=1e-2)
    with pytest.raises(ValueError, match="another trie"):
        engine.search(["a cat"], k=1, beams=1,
                      prior=search_prior(engine.stored, PriorWeights(hubness=1.0), engine.stored.trie(keys[:3])))


def test_saved_model_reloads_with_the_same_top_k(engine):
    again = TransformersEngine(StoredModel.open(engine.stored.path), device="cpu")
    queries = ["a rocket at night", "an astronaut in a suit", "brown coffee"]
    first = engine.search(queries, k=3, beams=3)
    second = again.search(queries, k=3, beams=3)
    assert [[h.key for h in row] for row in first] == [[h.key for h in row] for row in second]
    for a, b in zip(first, second):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


def test_the_stored_tokenizer_is_the_one_autotokenizer_loads(engine, tiny_catalog):
    """StoredModel builds its tokenizer from tokenizer.json directly (AutoTokenizer is 5x slower
    at a million ids); it must be the same tokenizer: vocabulary, special tokens, and what it
    makes of captions, id tokens and prompts both ways."""
    from transformers import AutoTokenizer

    ours, reference = engine.stored.load_tokenizer(), AutoTokenizer.from_pretrained(engine.stored.lm_path)
    assert len(ours) == len(reference) and ours.get_vocab() == reference.get_vocab()
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "all_special_ids",
                      "chat_template", "padding_side", "model_max_length"):
        assert getattr(ours, attribute) == getattr(reference, attribute), attribute
    id_texts = [engine.stored.identifiers.ids[k] for k in tiny_catalog.keys()]
    texts = [c for captions in tiny_catalog.captions().values() for c in captions] + id_texts + [
        f"describe {t}: a dog<|im_end|>" for t in id_texts]
    for text in texts:
        for special in (False, True):
            assert ours.encode(text, add_special_tokens=special) == reference.encode(text, add_special_tokens=special)
    rng = random.Random(0)
    for _ in range(50):
        token_ids = rng.choices(range(len(reference)), k=12)
        for skip in (False, True):
            assert ours.decode(token_ids, skip_special_tokens=skip) == reference.decode(token_ids, skip_special_tokens=skip)


def test_stored_keys_are_the_catalogs_in_its_order(engine):
    """StoredModel.keys (from identifiers.json) orders the image embeddings and hubness, as the
    catalog's keys did."""
    assert engine.stored.keys == engine.stored.catalog.keys()


def test_the_prompt_cache_changes_no_hit_or_score(engine):
    """Beam search over prompts computed once per query (then copied per beam) finds what it
    finds when every beam recomputes its prompt: prompts of different lengths (left padding)
    at a few widths of beam."""
    recomputing = TransformersEngine(engine.stored, device="cpu", cache_prompts=False)
    queries = ["a cat", "an astronaut in a white suit floating above the earth", "brown coffee beans in a cup"]
    for beams in (4, 7):
        cached, plain = engine.search(queries, k=4, beams=beams), recomputing.search(queries, k=4, beams=beams)
        assert [[h.key for h in row] for row in cached] == [[h.key for h in row] for row in plain]
        for a, b in zip(cached, plain):
            assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


def test_describe_and_ask_answer_from_the_id_alone(engine, tiny_catalog):
    key = "rocket.jpg"
    description = engine.describe(key)
    assert description and len(description) < 400
    answer = engine.ask(key, "What is in this image?")
    assert answer and len(answer) < 400


def test_a_model_trained_to_ask_from_its_description_describes_before_it_asks(engine, monkeypatch):
    """(The manifest says how the model was trained to be asked; the engine follows it.)"""
    key, question = "horse.jpg", "Is there a horse in this image?"
    ids = engine.stored.image_id_tokens(key)
    assert engine.ask(key, question) == engine.generate([engine.prompts.ask(ids, question)])[0]
    monkeypatch.setitem(engine.stored.manifest["train_config"], "ask_from_description", True)
    after_description = engine.prompts.ask(ids, question, engine.describe(key))
    assert after_description[: len(engine.prompts.describe(ids))] == engine.prompts.describe(ids)
    assert engine.ask(key, question) == engine.generate([after_description])[0]


def test_a_model_trained_to_ask_after_several_descriptions_joins_its_best_beams(engine, tiny_catalog, monkeypatch):
    key, question = "horse.jpg", "Is there a horse in this image?"
    ids = engine.stored.image_id_tokens(key)
    for field, value in (("ask_from_description", True), ("ask_descriptions", 3)):
        monkeypatch.setitem(engine.stored.manifest["train_config"], field, value)
    [beams] = engine.generate_beams([engine.prompts.describe(ids)], 3)
    assert 1 <= len(beams) == len(set(beams)) <= 3 and all(beams)
    assert engine.generate_beams([engine.prompts.describe(ids)], 1) == [[engine.describe(key)]]  # one beam is greedy
    assert engine.ask_contexts([key]) == [" ".join(beams)]
    assert engine.ask(key, question) == engine.generate([engine.prompts.ask(ids, question, " ".join(beams))])[0]
    keys = tiny_catalog.keys()[:4]
    own = {k: [context] for k, context in zip(keys, engine.ask_contexts(keys))}  # each image's caption: its beams
    scores = evaluate_describe_and_ask(engine, own, words_per_image=50, progress=False)
    assert scores["questions_stated"] == scores["questions"] > 0  # the words of every beam are stated


def test_a_model_asking_from_its_description_is_also_scored_on_the_questions_that_description_answers(
        engine, tiny_catalog, monkeypatch):
    monkeypatch.setitem(engine.stored.manifest["train_config"], "ask_from_description", True)
    all_keys = tiny_catalog.keys()
    described = engine.generate([engine.prompts.describe(engine.stored.id_tokens[k]) for k in all_keys])
    # up to 4 images it describes apart: the stated questions ask a word one description says of
    # an image whose description does not (a tiny model describes some images alike, seed to seed)
    first_described = {}  # description -> the first image it describes
    for key, description in zip(all_keys, described):
        first_described.setdefault(description, key)
    own = {key: [d] for d, key in list(first_described.items())[:4]}  # each image's one caption: its description
    keys = list(own)
    assert len(keys) >= 2, f"it describes every image alike: {described[0]!r}"
    scores = evaluate_describe_and_ask(engine, own, words_per_image=50, progress=False)
    assert scores["describe_exact"] == 1.0
    assert scores["questions_stated"] == scores["questions"] > 0
    assert scores["yes_no_stated_accuracy"] == scores["yes_no_accuracy"]
    assert scores["yes_no_by_description"] == 1.0  # its descriptions are the references
    more = {**own, keys[0]: [*own[keys[0]], "Zebras and giraffes."]}  # words its description does not say
    scores = evaluate_describe_and_ask(engine, more, words_per_image=50, progress=False)
    assert 0 < scores["questions_stated"] < scores["questions"]
    assert scores["yes_no_by_description"] < 1.0  # "zebras" is asked "yes" of it
    monkeypatch.setitem(engine.stored.manifest["train_config"], "ask_from_description", False)
    assert "yes_no_stated_accuracy" not in evaluate_describe_and_ask(engine, own, progress=False)


def test_the_yes_no_leaning_is_the_one_greedy_decoding_follows(engine, tiny_catalog):
    """answers() reads each prompt's leaning off the first answer token as generate() picks it, left
    padding included (prompts of different lengths share a batch); only a yes or no answer has a
    yes_probability."""
    from genret.decoding import Answer, FirstStepLogOdds
    from genret.training import presence_question

    prompts = [engine.prompts.ask(engine.stored.id_tokens[k], presence_question(word))
               for k in tiny_catalog.keys() for word in ("horse", "person on a bench")]
    answers = engine.answers(prompts, max_new_tokens=2)
    assert [a.text for a in answers] == engine.generate(prompts, max_new_tokens=2)
    said = [a for a in answers if a.is_yes_or_no]
    assert said, f"the model answers neither yes nor no: {answers[:3]}"
    assert all((a.yes_probability > 0.5) == a.text.lower().startswith("yes") for a in said), said
    [alone] = engine.answers(prompts[-1:], max_new_tokens=2)
    assert alone.yes_log_odds == pytest.approx(answers[-1].yes_log_odds, abs=1e-3)
    assert Answer("A rocket on its launch pad.", 3.0).yes_probability is None
    assert Answer("No, it is a bus.", 0.0).yes_probability == 0.5 and not Answer("Nothing.", 1.0).is_yes_or_no
    # the evaluation counts an answer right by the same reading
    assert [Answer(t, 0.0).verdict for t in ("Yes.", "no", "Nothing.", "Not sure.", "")] == [True, False, None, None, None]
    with pytest.raises(ValueError, match="twice"):
        FirstStepLogOdds(7, 7)


def test_descriptions_of_memorized_images_match_their_own_captions(engine, tiny_catalog):
    """(The tiny model confuses some neighbours, so the bar is: its own captions beat another image's.)"""
    keys = tiny_catalog.keys()
    own = {k: tiny_catalog[k].captions for k in keys}
    scores = evaluate_describe_and_ask(engine, own, progress=False)
    # three words each image's captions mention, and three they do not
    assert scores["images"] == len(keys) and scores["questions"] == 2 * 3 * len(keys)
    # half the answers are yes, so saying yes more or less often than that costs accuracy
    assert scores["yes_no_accuracy"] <= 1 - abs(scores["yes_share"] - 0.5) + 1e-9
    assert 0.0 <= scores["yes_no_accuracy"] <= 1.0
    assert 0.5 <= scores["yes_no_word_prior"] <= 1.0  # "always yes" and "always no" are among its rules
    assert 0.0 <= scores["yes_no_auc"] <= 1.0 and 0.0 <= scores["yes_no_by_description"] <= 1.0
    others = {k: tiny_catalog[keys[(i + 1) % len(keys)]].captions for i, k in enumerate(keys)}
    assert scores["describe_word_f1"] > evaluate_describe_and_ask(engine, others, progress=False)["describe_word_f1"] + 0.1


def test_the_yes_no_word_prior_is_chance_where_no_word_is_commoner_than_another(engine, tiny_catalog):
    """Each image's caption words its own: how many images mention a word cannot tell yes from no."""
    words = ["alpha", "bravo", "charlie", "delta", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
             "mike"]
    references = {k: [" ".join(words[3 * i : 3 * i + 3])] for i, k in enumerate(tiny_catalog.keys()[:4])}
    scores = evaluate_describe_and_ask(engine, references, progress=False)
    assert scores["questions"] == 4 * 6 and scores["yes_no_word_prior"] == 0.5


def test_word_f1_scores_content_words_against_the_best_reference():
    assert word_f1("A dog runs on the grass.", ["A cat sleeps.", "The dog runs on grass."]) == 1.0
    assert word_f1("A dog.", ["A dog runs."]) == pytest.approx(2 / 3)
    assert word_f1("", ["A dog."]) == 0.0


def test_reranking_weighs_the_beam_score_against_the_embedding_similarity():
    hits = [[Hit("a", -0.1), Hit("b", -2.0), Hit("c", -3.0)]]
    similarities = [[0.1, 0.5, 0.9]]
    assert [h.key for h in reranked(hits, similarities, 0.0)[0]] == ["a", "b", "c"]
    assert [h.key for h in reranked(hits, similarities, 1000.0)[0]] == ["c", "b", "a"]
    assert reranked(hits, similarities, 10.0)[0][0] == Hit("c", pytest.approx(-3.0 + 9.0))
    hubness = [[0.2, 0.1, 0.9]]  # "c" sits near many training captions: a hubness weight takes that back
    assert [h.key for h in reranked(hits, similarities, 10.0, hubness, 10.0)[0]] == ["b", "a", "c"]
    with pytest.raises(ValueError, match="hubness"):
        reranked(hits, similarities, 10.0, None, 1.0)


def test_recall_is_reported_at_every_rerank_weight_from_the_same_beams(engine, tiny_catalog):
    queries = [(img.captions[0], img.key) for img in tiny_catalog]
    reranker = EmbeddingReranker(engine.stored, weight=5.0, hubness_weight=2.0)
    grid = [(w, h) for w in (0.0, 5.0, 1e6) for h in (0.0, 2.0)]
    result = evaluate_generative(engine, queries, beams=6, reranker=reranker, rerank_grid=grid, progress=False)
    by_weight = result["reranked_by_weight"]
    assert set(by_weight) == {"0,0", "0,2", "5,0", "5,2", "1e+06,0", "1e+06,2"}
    assert by_weight["0,0"] == {k: result[k] for k in ("R@1", "R@5", "R@10")}  # weight 0: the beam's own order
    assert result["reranked"] == {"weight": 5.0, "hubness_weight": 2.0, **by_weight["5,2"]}
    # the grid's numpy ranking is `reranked`'s, at every pair
    hits = engine.search([q for q, _ in queries], k=6, beams=6)
    sims, hubness = reranker.similarities([q for q, _ in queries], hits), reranker.hubness(hits)
    for w, h in grid:
        ranked = reranked(hits, sims, w, hubness, h)
        assert by_weight[f"{w:g},{h:g}"] == recall([[x.key for x in row] for row in ranked], [k for _, k in queries])
