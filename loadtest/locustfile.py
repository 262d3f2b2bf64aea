"""Locust load test of the genret service: mostly searches with held-out queries (some of them
next pages, some within a few images), some descriptions and questions about memorized images,
and ~4 % requests that must be refused.

    locust -f loadtest/locustfile.py --host http://localhost:8000              # web UI on :8089
    locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 60s --host ...    # headless
    .venv/bin/python loadtest/run.py --engine transformers                      # service + locust + report

What is sent, and what counts as a failure, is in request_mix.py (LOADTEST_QUERIES,
LOADTEST_IDS, LOADTEST_MIX, LOADTEST_MAX_K, LOADTEST_SEED; GENRET_API_KEY where the service has
one). An expected 404 / 422 is a
success; a 5xx, a timeout, or any status other than the expected one is a failure.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # request_mix, wherever locust is started

from locust import FastHttpUser, between, events, task  # noqa: E402
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV  # noqa: E402

from request_mix import (  # noqa: E402
    ALL_TASKS, DEFAULT_MIX, KnownIds, RequestMix, check, env_int, fetch_readiness, for_tasks, load_ids,
    load_queries, parse_mix)

QUERIES = load_queries()
KNOWN = KnownIds(load_ids())  # shared by all users: grows with the ids searches return
WEIGHTS = parse_mix(os.environ.get("LOADTEST_MIX", DEFAULT_MIX))
MAX_K = env_int("LOADTEST_MAX_K", 100)
SEED = os.environ.get("LOADTEST_SEED", "").strip()
API_KEY = os.environ.get("GENRET_API_KEY")  # the service's, when it requires one (sent with every request)
_user_numbers = itertools.count()
_environment = None
_tasks: tuple[str, ...] = ALL_TASKS  # what the served model was trained for: asked at the start
_catalog_size: int | None = None  # how many images it serves: a next page past the last is refused


@events.test_start.add_listener
def _ask_what_the_model_was_trained_for(environment, **_):
    """A model trained for search only refuses describe / ask (409): draw them only as bad requests."""
    global _tasks, _catalog_size
    ready = fetch_readiness(environment.host) if environment.host else {"tasks": None, "images": None}
    tasks, _catalog_size = ready["tasks"], ready["images"]
    if _catalog_size is None:
        print(f"loadtest: {environment.host}/readyz did not say how many images the model has; no next pages")
    if tasks is None:
        print(f"loadtest: {environment.host}/readyz did not list the model's tasks; assuming {', '.join(ALL_TASKS)}")
        return
    try:
        for_tasks(WEIGHTS, tasks)
    except ValueError as e:  # nothing left to draw: stop here, once, rather than in every user
        print(f"loadtest: {e}")
        environment.process_exit_code = 2
        environment.runner.quit()
        return
    _tasks = tasks
    if set(ALL_TASKS) - set(tasks):
        print(f"loadtest: the model is trained for {', '.join(tasks)} only; the others are sent as bad requests (409)")


@events.init.add_listener
def _remember_environment(environment, **_):
    global _environment
    _environment = environment


@events.quit.add_listener
def _write_final_stats(**_):
    """LOADTEST_FINAL_CSV=PREFIX: the final statistics as PREFIX_stats.csv / PREFIX_failures.csv.
    (Locust's own --csv files are rewritten once a second and can miss the last requests of
    the stop phase; these match the summary Locust prints.) loadtest/run.py reads them."""
    prefix = os.environ.get("LOADTEST_FINAL_CSV", "").strip()
    if not prefix or _environment is None:
        return
    stats = StatsCSV(_environment, PERCENTILES_TO_REPORT)
    for suffix, write in (("stats", stats.requests_csv), ("failures", stats.failures_csv)):
        with open(f"{prefix}_{suffix}.csv", "w", newline="") as f:
            write(csv.writer(f))


class GenretUser(FastHttpUser):
    """One client: a short think time, then the next request of the mix."""

    wait_time = between(0.05, 0.5)
    network_timeout = 120.0
    connection_timeout = 30.0

    def on_start(self):
        seed = int(SEED) * 1_000_003 + next(_user_numbers) if SEED else None
        self.mix = RequestMix(QUERIES, KNOWN, WEIGHTS, MAX_K, random.Random(seed), tasks=_tasks,
                              catalog_size=_catalog_size)

    @task
    def request(self):
        call = self.mix.next()
        headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
        kwargs: dict = {"name": call.name, "catch_response": True, "headers": headers}
        if call.json is not None:
            kwargs["json"] = call.json
        elif call.data is not None:
            kwargs["data"] = call.data
            headers["content-type"] = "application/json"
        with self.client.request(call.method, call.path, **kwargs) as response:
            try:
                body = json.loads(response.text) if response.text else None
            except ValueError:
                body = None
            problem = check(call, response.status_code or 0, body)
            if problem is None:
                response.success()
                if call.path == "/search" and call.valid:  # a refused one has no results
                    KNOWN.add(r.get("image_id") for r in body["results"] if isinstance(r, dict))
                    self.mix.answered(call, body)
                return
            detail = body.get("detail") if isinstance(body, dict) else None
            if detail:
                problem += f": {str(detail)[:200]}"
            elif not response.status_code and response.error:
                problem += f" ({response.error})"
            response.failure(problem)
