"""The request mix of the load test (loadtest/locustfile.py), in plain Python: no Locust
import here (it monkey-patches the process with gevent), so the tests check the mix's rates
directly.

* POST /search with a query drawn from held-out captions (`LOADTEST_QUERIES`: a text file of
  one query a line, or an `image,caption` CSV; default: the demo catalog's held-out
  paraphrases, `genret.demo_catalog.demo_queries()`), k drawn from 1..10;
* the next page of the user's last search: the same query with `exclude` naming every id its
  pages showed (after a full page, at most 5 pages deep, while the catalog has more images than
  were shown: /readyz says how many); its hits must be none of those;
* a search `within` 1..20 known ids (an album, a shop's products); its hits must be among them;
* POST /describe/{id} and POST /ask for ids the model has memorized: `LOADTEST_IDS` (a file of
  one id a line, or a comma-separated list) if set, else the ids the service itself returned
  in earlier searches (so any model works without configuration);
* about 4 % bad requests: unknown ids (404 expected) and an empty query, k=0, k over the
  maximum, an unknown field, malformed JSON, a lone surrogate, a search within an unknown id or
  within none, an `exclude` that is no list (422 expected).

A model trained for search only refuses describe and ask with 409 (its /readyz lists the
tasks it was trained for): the mix then leaves those kinds out, renormalizing the rest, and
its bad requests include a describe and an ask that must get that 409.

A request counts as a success when the status is the expected one (a refused bad request is
the service working), and as a failure on any other status: a 5xx, a 4xx for a valid request,
or a 200 for a bad one. Requests are named by endpoint and expectation (`/describe/[id]`,
`/describe/[id] 404`, `/search next page`, `/search 422`, ...) so Locust's statistics group well.

Environment: LOADTEST_QUERIES, LOADTEST_IDS, LOADTEST_MIX (weights, default
"search=70,next_page=6,within=4,describe=8,ask=8,bad=4"), LOADTEST_MAX_K (the service's GENRET_MAX_K, default 100),
LOADTEST_SEED (per-user random streams, default unseeded).
"""

from __future__ import annotations

import csv
import os
import random
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

# Questions asked about a memorized image (POST /ask).
QUESTIONS = [
    "What is in this image?",
    "Describe this picture briefly.",
    "Is there a person in this image?",
    "Is this photo in color?",
    "What is the main object?",
    "Is it taken outdoors?",
]

DEFAULT_MIX = "search=70,next_page=6,within=4,describe=8,ask=8,bad=4"
KINDS = ("search", "next_page", "within", "describe", "ask", "bad")
SEARCHES = ("search", "next_page", "within")  # the kinds a model trained for search answers
ALL_TASKS = ("search", "describe", "ask")
MAX_PAGES = 5  # a user pages this deep at most, then searches anew
MAX_WITHIN = 20  # a search within some images names 1..MAX_WITHIN known ids

# Used only when neither LOADTEST_QUERIES nor genret is importable (a bare locust image).
FALLBACK_QUERIES = [
    "female astronaut in an orange suit",
    "tabby cat face close up",
    "espresso in a red cup",
    "ancient coins in rows",
    "horse silhouette",
    "galaxies in deep space",
    "rocket on the launch pad at night",
    "handwritten equations",
]


@dataclass(frozen=True)
class Call:
    """One HTTP request of the mix and the status that means the service behaved."""

    method: str
    path: str
    name: str  # Locust's statistics key
    expect: int
    json: object | None = None  # a JSON body
    data: bytes | None = None  # a raw body (malformed JSON)
    kind: str = "search"  # one of KINDS

    @property
    def valid(self) -> bool:
        return self.expect == 200


def parse_mix(text: str) -> dict[str, float]:
    """'search=70,next_page=6,within=4,describe=8,ask=8,bad=4' -> normalized weights; unknown kinds are an error."""
    weights = {k: 0.0 for k in KINDS}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in weights:
            raise ValueError(f"LOADTEST_MIX: expected kind=weight with kind in {KINDS}, got {part!r}")
        try:
            weights[kind] = float(value)
        except ValueError:
            weights[kind] = float("nan")
        if not 0 <= weights[kind] < float("inf"):
            raise ValueError(f"LOADTEST_MIX: the weight in {part!r} is not a finite number >= 0")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"LOADTEST_MIX: the weights sum to {total}")
    return {k: v / total for k, v in weights.items()}


def for_tasks(weights: dict[str, float], tasks) -> dict[str, float]:
    """The mix without the kinds the model was not trained for, renormalized."""
    kept = {k: (w if k == "bad" or ("search" if k in SEARCHES else k) in tasks else 0.0) for k, w in weights.items()}
    total = sum(kept.values())
    if total <= 0:
        raise ValueError(f"LOADTEST_MIX: the model is trained for {', '.join(tasks)} only, "
                         f"and the mix weights nothing else")
    return {k: w / total for k, w in kept.items()}


def fetch_readiness(host: str, timeout_s: float = 10.0) -> dict:
    """What the service's /readyz says, read as the mix needs it: `tasks` (what the model was trained
    for) and `images` (how many it serves), each None where it does not say."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(host.rstrip("/") + "/readyz", timeout=timeout_s) as response:
            ready = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        ready = None
    return readiness(ready)


def readiness(ready: object) -> dict:
    ready = ready if isinstance(ready, dict) else {}
    tasks, images = ready.get("tasks"), ready.get("images")
    return {"tasks": tuple(t for t in tasks if isinstance(t, str)) if isinstance(tasks, list) else None,
            "images": images if isinstance(images, int) and not isinstance(images, bool) and images > 0 else None}


def load_queries(source: str | None = None) -> list[str]:
    """Queries from a text file (one a line) or an image,caption CSV; default: the demo's held-out ones."""
    source = source if source is not None else os.environ.get("LOADTEST_QUERIES")
    if source:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"LOADTEST_QUERIES={source}: no such file")
        text = path.read_text(encoding="utf-8-sig")
        lines = text.splitlines()
        if lines and lines[0].strip().lower().replace(" ", "") in ("image,caption", "caption"):
            queries = [row["caption"] for row in csv.DictReader(lines)]
        else:
            queries = lines
        queries = [q.strip() for q in queries if q and q.strip()]
        if not queries:
            raise ValueError(f"LOADTEST_QUERIES={source}: no queries in it")
        return queries
    try:
        from genret.demo_catalog import demo_queries
    except ImportError:
        return list(FALLBACK_QUERIES)
    return [q for q, _ in demo_queries()]


def load_ids(source: str | None = None) -> list[str]:
    """Known image ids from LOADTEST_IDS (a file of one id a line, or a comma list); may be empty."""
    source = source if source is not None else os.environ.get("LOADTEST_IDS", "")
    if not source.strip():
        return []
    path = Path(source)
    items = path.read_text(encoding="utf-8").splitlines() if path.is_file() else source.split(",")
    return [i.strip() for i in items if i.strip()]


class KnownIds:
    """Ids to describe / ask about: the configured ones, plus every id a search returned.
    Shared by all users of a Locust process (gevent greenlets, but locked anyway)."""

    def __init__(self, ids=()):
        self._lock = threading.Lock()
        self._ids: list[str] = []
        self._seen: set[str] = set()
        self.add(ids)

    def add(self, ids) -> None:
        with self._lock:
            for i in ids:
                if i and i not in self._seen:
                    self._seen.add(i)
                    self._ids.append(i)

    def pick(self, rng: random.Random) -> str | None:
        with self._lock:
            return rng.choice(self._ids) if self._ids else None

    def sample(self, rng: random.Random, n: int) -> list[str]:
        with self._lock:
            return rng.sample(self._ids, min(n, len(self._ids)))

    def __len__(self) -> int:
        return len(self._ids)


class RequestMix:
    """Draws the next request of one user. Describe / ask / within need known ids, and a next page
    an answered search: until then they fall back to a search. `tasks`: what the model was trained
    for (its /readyz); the others are drawn only as bad requests (409). `catalog_size`: how many
    images the service has (its /readyz); unknown, no next page is drawn, since one past the last
    image is refused."""

    def __init__(self, queries: list[str], known: KnownIds, weights: dict[str, float] | None = None,
                 max_k: int = 100, rng: random.Random | None = None, tasks=ALL_TASKS,
                 catalog_size: int | None = None):
        if not queries:
            raise ValueError("no queries to search with")
        self.queries, self.known, self.max_k = queries, known, max_k
        self.tasks = tuple(tasks)
        self.catalog_size = catalog_size
        self.weights = for_tasks(weights or parse_mix(DEFAULT_MIX), self.tasks)
        self.rng = rng or random.Random()
        self._kinds = list(self.weights)
        self._weights = list(self.weights.values())
        self._paging: tuple[str, int, list[str]] | None = None  # the last search's query, k, the ids its pages showed

    def next(self) -> Call:
        kind = self.rng.choices(self._kinds, weights=self._weights)[0]
        if kind in ("describe", "ask"):
            image_id = self.known.pick(self.rng)
            if image_id is not None:
                return self.describe(image_id) if kind == "describe" else self.ask(image_id)
        elif kind == "next_page" and self._paging is not None:
            return self.next_page()
        elif kind == "within" and (ids := self.known.sample(self.rng, self.rng.randint(1, MAX_WITHIN))):
            return self.within(ids)
        return self.bad() if kind == "bad" else self.search()

    def answered(self, call: Call, body: dict) -> None:
        """A search's or next page's hits, answered as expected: the user's next page leaves them
        out too, if the page was full, not too deep, and the catalog has images not yet shown."""
        if call.kind not in ("search", "next_page") or not call.valid:
            return
        query, k = call.json["query"], call.json["k"]
        hits = [r.get("image_id") for r in body["results"] if isinstance(r, dict)]
        shown = [*call.json.get("exclude", ()), *hits]  # every page so far was full: len(shown) / k of them
        more = (len(hits) == k and len(shown) < MAX_PAGES * k and self.catalog_size is not None
                and len(set(shown)) < self.catalog_size)
        self._paging = (query, k, shown) if more else None

    def _query_and_k(self) -> dict:
        k = min(self.rng.choice((1, 3, 5, 5, 10, 10)), self.max_k)
        return {"query": self.rng.choice(self.queries), "k": k}

    def search(self) -> Call:
        return Call("POST", "/search", "/search", 200, json=self._query_and_k())

    def next_page(self) -> Call:
        query, k, shown = self._paging
        return Call("POST", "/search", "/search next page", 200, json={"query": query, "k": k, "exclude": shown},
                    kind="next_page")

    def within(self, ids: list[str]) -> Call:
        return Call("POST", "/search", "/search within", 200, json={**self._query_and_k(), "within": ids},
                    kind="within")

    def describe(self, image_id: str) -> Call:
        return Call("POST", f"/describe/{quote(image_id)}", "/describe/[id]", 200, kind="describe")

    def ask(self, image_id: str) -> Call:
        return Call("POST", "/ask", "/ask", 200, json={"image_id": image_id, "question": self.rng.choice(QUESTIONS)},
                    kind="ask")

    def bad(self) -> Call:
        unknown = f"no-such-image-{uuid.UUID(int=self.rng.getrandbits(128)).hex[:12]}.jpg"
        query = self.rng.choice(self.queries)
        # An untaught task is refused (409) before the id is looked up.
        describe, ask = (404 if task in self.tasks else 409 for task in ("describe", "ask"))
        options = [
            Call("POST", f"/describe/{unknown}", f"/describe/[id] {describe}", describe, kind="bad"),
            Call("POST", "/ask", f"/ask {ask}", ask, json={"image_id": unknown, "question": QUESTIONS[0]}, kind="bad"),
            Call("POST", "/search", "/search 422", 422, json={"query": "   ", "k": 5}, kind="bad"),
            Call("POST", "/search", "/search 422", 422, json={"query": query, "k": 0}, kind="bad"),
            Call("POST", "/search", "/search 422", 422, json={"query": query, "k": self.max_k + 1}, kind="bad"),
            Call("POST", "/search", "/search 422", 422, json={"query": query, "top": 5}, kind="bad"),
            Call("POST", "/search", "/search 422", 422, data=b'{"query": "unterminated', kind="bad"),
            # valid JSON, but no string: a lone surrogate (the 422 that echoed it was once a 500)
            Call("POST", "/search", "/search 422", 422, data=b'{"query": "a \\ud800 dog"}', kind="bad"),
            Call("POST", "/search", "/search 422", 422, json={"query": query, "within": [unknown]}, kind="bad"),
            Call("POST", "/search", "/search 422", 422, json={"query": query, "within": []}, kind="bad"),
            Call("POST", "/search", "/search 422", 422, json={"query": query, "exclude": unknown}, kind="bad"),
        ]
        return self.rng.choice(options)


def check(call: Call, status: int, body: object) -> str | None:
    """None if the response is what the call expects, else why it is a failure."""
    if status != call.expect:
        return f"expected HTTP {call.expect}, got {status}"
    if status != 200:
        return None
    if not isinstance(body, dict):
        return "the response is not a JSON object"
    if call.path == "/search":
        results = body.get("results")
        if not isinstance(results, list) or not results:
            return "no search results"
        if len(results) > call.json["k"]:
            return f"{len(results)} results for k={call.json['k']}"
        keys = [r.get("image_id") if isinstance(r, dict) else None for r in results]
        if call.kind == "within" and (outside := [key for key in keys if key not in call.json["within"]]):
            return f"a hit outside the images searched within: {outside[0]!r}"
        if call.kind == "next_page" and (shown := [key for key in keys if key in call.json["exclude"]]):
            return f"a hit the next page leaves out: {shown[0]!r}"
    elif call.kind == "describe" and not isinstance(body.get("description"), str):
        return "no description"
    elif call.kind == "ask" and not isinstance(body.get("answer"), str):
        return "no answer"
    return None


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
