"""One command for a load test: start the service on a trained model, wait until it is ready,
run a bounded headless Locust against it, stop the service, and write the report.

    .venv/bin/python loadtest/run.py --engine transformers --users 4 --duration 60s
    .venv/bin/python loadtest/run.py --engine vllm --users 8 --duration 90s --label cpu-vllm

It writes loadtest/results/<label>.json and .md (requests, RPS, p50/p95/p99 and error rate
per endpoint and in total, with the settings and the machine). The service's and Locust's
logs and Locust's raw CSVs go to runs/loadtest/<label>/ (not committed).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
FAILED_TO_LOAD = "the engine failed to load"  # service/app.py logs this when the engine cannot start


class LoadTestError(Exception):
    """A problem the user can fix: printed as one message (plus a log tail), no traceback."""


def parse_duration(text: str) -> float:
    """Locust's run-time syntax: 90, 90s, 1m30s, 1h."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+)\s*([hms])", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s", "", text):
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 60s, 1m30s")
    return float(sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def http_json(url: str, timeout: float = 5.0) -> tuple[int, object]:
    """(status, JSON body) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None
    except (OSError, ValueError):
        return 0, None


def resolve_model(name: str) -> Path:
    try:
        from service.settings import SettingsError, load_settings
    except ImportError as e:
        raise LoadTestError(f"cannot import the service ({e}); run this with the project's venv: "
                            ".venv/bin/python loadtest/run.py") from None
    try:
        path = load_settings(model=name).model_path
    except SettingsError as e:
        raise LoadTestError(str(e)) from None
    if not (path / "manifest.json").is_file():
        hint = " (`.venv/bin/genret demo` trains it)" if name == "demo" else " (train one with `genret train`)"
        raise LoadTestError(f"model {name!r}: no trained model at {path}{hint}")
    return path.resolve()


def machine_info() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        info["memory_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, AttributeError):
        pass
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            info["gpus"] = [g.strip() for g in out.stdout.strip().splitlines()]
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class Service:
    """`python -m service` in its own process group, logging to a file."""

    def __init__(self, env: dict, log_path: Path):
        self.log_path = log_path
        self.log = log_path.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, url: str, timeout_s: float) -> dict:
        start = time.monotonic()
        last = None
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise LoadTestError(f"the service exited with status {self.proc.returncode} before it was ready; "
                                    f"the end of its log ({self.log_path}):\n{tail(self.log_path)}")
            status, body = http_json(url + "/readyz")
            if status == 200:
                return body
            last = body
            if FAILED_TO_LOAD in tail(self.log_path, 200):
                reason = body.get("reason") if isinstance(body, dict) else body
                raise LoadTestError(f"the engine failed to load: {reason}\nthe end of the service log "
                                    f"({self.log_path}):\n{tail(self.log_path)}")
            time.sleep(1.0)
        raise LoadTestError(f"the service was not ready after {timeout_s:.0f} s (last /readyz: {last}); "
                            f"the end of its log ({self.log_path}):\n{tail(self.log_path)}")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGINT (uvicorn shuts down, closing the engine), then SIGTERM, then SIGKILL of the group."""
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        for sig, wait in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 15.0)):
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(wait)
                except subprocess.TimeoutExpired:
                    continue
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:  # engine worker processes that outlived the server (vLLM's engine core)
            os.killpg(pgid, 0)
            time.sleep(2)
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log.close()
        return self.proc.returncode


def run_locust(args, url: str, work: Path, env: dict) -> int:
    prefix = work / "locust"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(args.users),
           "-r", str(args.spawn_rate), "-t", args.duration, "--host", url, "--csv", str(prefix),
           "--only-summary", "--stop-timeout", "30", "--exit-code-on-error", "0"]
    log_path = work / "locust.log"
    env = {**env, "LOADTEST_FINAL_CSV": str(work / "final")}  # written by the locustfile at exit
    print(f"locust: {args.users} users, spawn rate {args.spawn_rate}/s, {args.duration} against {url}", flush=True)
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=parse_duration(args.duration) + 180)
    if proc.returncode != 0 or not (work / "final_stats.csv").is_file():
        raise LoadTestError(f"locust failed (exit status {proc.returncode}); the end of its log ({log_path}):\n"
                            f"{tail(log_path)}")
    return proc.returncode


def _num(row: dict, key: str) -> float | None:
    value = (row.get(key) or "").strip()
    if value in ("", "N/A"):
        return None
    return float(value)


def read_stats(stats_csv: Path, failures_csv: Path) -> tuple[list[dict], dict, list[dict]]:
    """Per-endpoint rows, the total, and the failures, from Locust's CSVs (times in ms)."""
    def entry(row: dict) -> dict:
        requests, failures = int(row["Request Count"]), int(row["Failure Count"])
        return {
            "method": row["Type"] or None, "name": row["Name"], "requests": requests, "failures": failures,
            "error_rate": round(failures / requests, 4) if requests else None,
            "rps": round(float(row["Requests/s"]), 3),
            "avg_ms": _round(_num(row, "Average Response Time")), "p50_ms": _num(row, "50%"),
            "p95_ms": _num(row, "95%"), "p99_ms": _num(row, "99%"), "max_ms": _round(_num(row, "Max Response Time")),
        }

    with stats_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    endpoints = [entry(r) for r in rows if r["Name"] != "Aggregated"]
    totals = [entry(r) for r in rows if r["Name"] == "Aggregated"]
    total = totals[0] if totals else {"requests": 0, "failures": 0, "error_rate": None, "rps": 0.0}
    failures = []
    if failures_csv.is_file():
        with failures_csv.open(newline="") as f:
            failures = [{"method": r["Method"], "name": r["Name"], "error": r["Error"],
                         "occurrences": int(r["Occurrences"])} for r in csv.DictReader(f)]
    return endpoints, total, failures


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _fmt(x, digits: int = 0) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    lines = [
        f"# Load test `{report['label']}`",
        "",
        f"{report['created']} · model `{s['model']}` · engine `{report['engine']}` · {s['users']} users "
        f"(spawn rate {s['spawn_rate']}/s) · {s['duration']} · mix `{s['mix']}`"
        + (f" · the model is not trained for {' or '.join(s['untrained_tasks'])}: sent only as bad requests (409)"
           if s.get("untrained_tasks") else ""),
        "",
        f"Machine: {m.get('cpu_model', m['machine'])}, {m['cpu_count']} CPUs"
        + (f" ({m['cpus_usable']} usable)" if m.get("cpus_usable") not in (None, m["cpu_count"]) else "")
        + (f", {m['memory_gib']} GiB" if m.get("memory_gib") else "")
        + (f", GPU {', '.join(m['gpus'])}" if m.get("gpus") else ", no GPU")
        + f"; {m['platform']}; load average before/after {report.get('load_average_before')} / "
          f"{report.get('load_average_after')}. The service was ready {report['ready_after_s']:.0f} s after start.",
        "",
        "| endpoint | requests | RPS | p50 ms | p95 ms | p99 ms | max ms | error rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in [*report["endpoints"], {**report["total"], "method": "", "name": "**total**"}]:
        name = f"{e.get('method') or ''} {e['name']}".strip()
        rate = "–" if e.get("error_rate") is None else f"{100 * e['error_rate']:.2f} %"
        lines.append(f"| {name} | {e['requests']} | {_fmt(e.get('rps'), 2)} | {_fmt(e.get('p50_ms'))} | "
                     f"{_fmt(e.get('p95_ms'))} | {_fmt(e.get('p99_ms'))} | {_fmt(e.get('max_ms'))} | {rate} |")
    lines += ["", "Rows named `... 404` / `... 409` / `... 422` are deliberately bad requests: the expected refusal "
              "counts as a success. Error rate = failures / requests (a 5xx, a timeout, or any unexpected status). Locust rounds "
              "latencies over 100 ms to 2 significant digits."]
    if report["failures"]:
        lines += ["", "Failures:", "", "| request | error | count |", "|---|---|---:|"]
        for f in report["failures"]:
            lines.append(f"| {f['method']} {f['name']} | {f['error'].replace('|', '/')} | {f['occurrences']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadtest/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="a name under model_store/ or a model folder (default: demo)")
    parser.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"])
    parser.add_argument("--users", type=int, default=4, help="concurrent Locust users")
    parser.add_argument("--spawn-rate", type=float, default=1.0, help="users started per second")
    parser.add_argument("--duration", default="60s", help="Locust run time: 60s, 1m30s, ...")
    parser.add_argument("--label", help="result file name (default: <cpu|gpu>-<engine>)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the result files")
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for /readyz")
    parser.add_argument("--redis-url", help="serve ids from this Redis (default: the model's own catalog)")
    parser.add_argument("--mix", default=None, help="LOADTEST_MIX weights, e.g. search=80,describe=8,ask=8,bad=4")
    args = parser.parse_args(argv)
    try:
        parse_duration(args.duration)
        if args.users < 1 or args.spawn_rate <= 0:
            raise LoadTestError("--users must be at least 1 and --spawn-rate positive")
        return run(args)
    except (LoadTestError, argparse.ArgumentTypeError) as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loadtest: interrupted", file=sys.stderr)
        return 130


def run(args) -> int:
    sys.path.insert(0, str(REPO))
    model_path = resolve_model(args.model)
    if importlib.util.find_spec("locust") is None:
        raise LoadTestError("locust is not installed: pip install -e '.[load]'")
    machine = machine_info()
    label = args.label or f"{'gpu' if machine.get('gpus') else 'cpu'}-{args.engine}"
    if not re.fullmatch(r"[\w.-]+", label):
        raise LoadTestError(f"--label {label!r}: use letters, digits, '.', '_' and '-'")
    work = REPO / "runs" / "loadtest" / label
    work.mkdir(parents=True, exist_ok=True)
    for old in [*work.glob("locust_*.csv"), *work.glob("final_*.csv")]:
        old.unlink()

    sys.path.insert(0, str(LOCUSTFILE.parent))
    from request_mix import ALL_TASKS, DEFAULT_MIX, for_tasks, parse_mix

    mix = args.mix or os.environ.get("LOADTEST_MIX", DEFAULT_MIX)
    try:
        parse_mix(mix)
    except ValueError as e:
        raise LoadTestError(str(e)) from None

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The caller's GENRET_* settings (beams, max_k, timeouts, vLLM knobs) pass through; these are ours.
    env = dict(os.environ)
    env.pop("GENRET_REDIS_URL", None)
    env.update(GENRET_MODEL=str(model_path), GENRET_ENGINE=args.engine, GENRET_HOST="127.0.0.1",
               GENRET_PORT=str(port), GENRET_PUBLIC_URL=url, GENRET_LOG_LEVEL="warning",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.redis_url:
        env["GENRET_REDIS_URL"] = args.redis_url
    env["LOADTEST_MIX"] = mix
    env.setdefault("LOADTEST_MAX_K", env.get("GENRET_MAX_K", "100"))

    load_before = load_average()
    print(f"starting the service: model {model_path}, engine {args.engine}, {url} (log: {work / 'service.log'})",
          flush=True)
    started = time.monotonic()
    service = Service(env, work / "service.log")
    try:
        readyz = service.wait_ready(url, args.ready_timeout)
        ready_after = time.monotonic() - started
        print(f"ready after {ready_after:.0f} s: {readyz}", flush=True)
        tasks = readyz.get("tasks") or list(ALL_TASKS)
        try:
            for_tasks(parse_mix(mix), tasks)
        except ValueError as e:
            raise LoadTestError(str(e)) from None
        run_locust(args, url, work, env)
        status_after, _ = http_json(url + "/healthz")
        if status_after != 200:
            raise LoadTestError(f"the service stopped answering during the load test; the end of its log:\n"
                                f"{tail(work / 'service.log')}")
    finally:
        print("stopping the service", flush=True)
        service.stop()
    load_after = load_average()

    endpoints, total, failures = read_stats(work / "final_stats.csv", work / "final_failures.csv")
    if not total["requests"]:
        raise LoadTestError(f"locust made no requests; its log: {work / 'locust.log'}")
    import locust

    report = {
        "label": label,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": readyz.get("engine", args.engine),
        "settings": {"model": readyz.get("model", args.model), "model_path": str(model_path), "engine": args.engine,
                     "users": args.users, "spawn_rate": args.spawn_rate, "duration": args.duration, "mix": mix,
                     "tasks": tasks, "untrained_tasks": [t for t in ALL_TASKS if t not in tasks],
                     "locust": locust.__version__,
                     "service_env": {k: "(set)" if k == "GENRET_API_KEY" else v for k, v in sorted(env.items())
                                     if k.startswith("GENRET_")
                                     and k not in ("GENRET_PORT", "GENRET_PUBLIC_URL", "GENRET_MODEL")}},
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "ready_after_s": round(ready_after, 1),
        "readyz": readyz,
        "total": total,
        "endpoints": endpoints,
        "failures": failures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / f"{label}.json", args.out / f"{label}.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
