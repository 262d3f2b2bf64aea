"""How well models trained on the demo catalog describe their images by id alone, by preset,
describe examples per image and epoch, and seed.

    python benchmarks/describe_demo.py                                  # tiny and cpu presets, 1 and 3, seeds 0-2
    python benchmarks/describe_demo.py --presets tiny --per-image 3 --seeds 1 --out /tmp/d   # one model

Each model is trained on the 18-image demo catalog (`genret demo`'s) into <out>/runs/, once:
a rerun reuses what is there when it was trained with the same config (it refuses another), and
the report names the commits that measured it. For each it reports the share of descriptions that are one of the
image's captions, their content-word F1 against the best one, yes/no accuracy and what word
frequency alone scores on the same questions (genret.evaluation.evaluate_describe_and_ask), the
demo queries' R@1 and the training seconds, in <out>/results.json and <out>/results.md. A few
minutes per model on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from vllm_search import REPO, git_commit  # also puts the repo on sys.path

from genret.model_store import write_json


def measure(run_dir: Path, model_dir: Path, config, catalog) -> dict:
    from genret.decoding import TransformersEngine
    from genret.demo_catalog import demo_queries
    from genret.evaluation import evaluate_describe_and_ask, recall
    from genret.model_store import StoredModel
    from genret.training import Trainer

    started = time.perf_counter()
    Trainer(catalog, config, run_dir, progress=False).train(model_dir)
    seconds = time.perf_counter() - started
    engine = TransformersEngine(StoredModel.open(model_dir))
    queries = demo_queries()
    hits = engine.search([q for q, _ in queries], k=1, beams=5)
    spoken = evaluate_describe_and_ask(engine, {k: catalog[k].captions for k in catalog.keys()}, progress=False)
    return {**spoken, "R@1": recall([[h.key for h in row] for row in hits], [t for _, t in queries], ks=(1,))["R@1"],
            "train_seconds": round(seconds, 1)}


def stated_cell(row: dict) -> str:
    """Only a model that asks after its own description has questions that description answers."""
    if "yes_no_stated_accuracy" not in row:
        return ""
    return f"{row['yes_no_stated_accuracy']:.3f} ({row['questions_stated']}/{row['questions']})"


def number_cell(row: dict, key: str) -> str:
    """Empty where a row predates the metric, or (an AUC) where its questions were all of one kind."""
    return "" if row.get(key) is None else f"{row[key]:.3f}"


def report(rows: list[dict]) -> str:
    lines = ["| preset | describe_per_image | seed | exact descriptions | describe F1 | yes/no | answered yes | word prior "
             "| yes/no AUC | yes/no by description | yes/no the description answers | demo R@1 | training s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['describe_per_image']} | {r['seed']} | "
                     f"{round(r['describe_exact'] * r['images'])}/{r['images']} | {r['describe_word_f1']:.3f} | "
                     f"{r['yes_no_accuracy']:.3f} | {number_cell(r, 'yes_share')} | "
                     f"{number_cell(r, 'yes_no_word_prior')} | {number_cell(r, 'yes_no_auc')} | "
                     f"{number_cell(r, 'yes_no_by_description')} | "
                     f"{stated_cell(r)} | {r['R@1']:.3f} | {r['train_seconds']:.0f} |")
    commits = sorted({r["commit"] for r in rows})
    return "\n".join(lines) + f"\n\nMeasured at commit{'s' * (len(commits) > 1)} {', '.join(commits)}.\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "cpu"])
    parser.add_argument("--per-image", type=int, nargs="+", default=[1, 3], help="describe_per_image values")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="another training config field, for all")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "describe-demo")
    args = parser.parse_args(argv)

    from genret.catalog import load_catalog
    from genret.cli import PRESETS, UsageError, build_config
    from genret.demo_catalog import write_demo_catalog

    if unknown := sorted(set(args.presets) - set(PRESETS)):
        parser.error(f"unknown preset(s) {', '.join(unknown)} (one of {', '.join(sorted(PRESETS))})")
    if min(args.per_image) < 1:
        parser.error("--per-image values must be at least 1")
    catalog = load_catalog(*write_demo_catalog(args.out / "catalog"))
    rows, commit = [], git_commit()
    for preset in args.presets:
        for per_image in args.per_image:
            for seed in args.seeds:
                try:
                    config = build_config(preset, None, [*(args.set or []), f"seed={seed}",
                                                         f"describe_per_image={per_image}"])
                except UsageError as e:
                    parser.error(str(e))
                name = f"{preset}-dpi{per_image}-seed{seed}"
                result_path = args.out / "runs" / name / "result.json"
                if result_path.exists():
                    row = json.loads(result_path.read_text())
                    if "config" not in row:
                        parser.error(f"{result_path} was measured before results recorded their training config: "
                                     "choose another --out")
                    if changed := config.differences(row["config"]):  # as a resumed training run compares them
                        now = config.model_dump(mode="json")
                        parser.error(f"{result_path} was measured with another training config ("
                                     + "; ".join(f"{k}={row['config'].get(k)!r} (now {now[k]!r})" for k in changed[:4])
                                     + "): choose another --out")
                    if row["commit"] != commit:
                        print(f"note: reusing {result_path}, measured at commit {row['commit']} (now {commit})",
                              file=sys.stderr)
                else:
                    row = {"preset": preset, "describe_per_image": per_image, "seed": seed, "sets": args.set or [],
                           **measure(args.out / "runs" / name, args.out / "models" / name, config, catalog),
                           "config": config.model_dump(mode="json"), "commit": commit}
                    write_json(result_path, row)
                print(json.dumps(row), flush=True)
                rows.append(row)
    machine = f"{platform.machine()}, {platform.processor() or 'CPU'}"
    write_json(args.out / "results.json", {"machine": machine, "commit": commit, "results": rows})
    (args.out / "results.md").write_text(report(rows))
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
