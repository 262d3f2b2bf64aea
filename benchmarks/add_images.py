"""Images added to a trained model without training (`genret add`) against the same images trained in.

On Flickr8k's protocol (`benchmarks/flickr8k.py`): the base model is trained on the train and
dev images alone, then the test images are added to it by `genret.adding.add_images`, with no
gradient step and without their captions. The reference is the same recipe trained with the
test images in its catalog from the start (memorized, with neighbour pseudo-queries: what
`genret train` does for uncaptioned images). Both are searched with the test captions, over the
test images and over the whole catalog, and asked to describe the test images by id alone.

    python benchmarks/add_images.py --setting cpu              # reduced: ~20 minutes a seed on 2 CPU cores
    python benchmarks/add_images.py --setting cpu --seeds 3    # mean ± standard deviation over 3 seeds
    python benchmarks/add_images.py --setting cpu --seeds 3 --captioned-queries   # also queries for trained images

Every test query seeks an added (uncaptioned) image, so an offset that favours added images can
only raise recall over the catalog; `--captioned-queries` (flickr8k.py's) also holds out one
caption of some train images and reports their recall beside, at each h and bonus, and checks
the (h, bonus) that `genret evaluate` chooses on half the queries against the other half.

Resumable: every model and every result is written as soon as it exists (<out>/seedN/). Results:
<out>/results.json and <out>/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flickr8k_protocol import DEFAULT_DATA, REPO, SETTINGS, build_catalog, protocol_of, run_config  # noqa: E402

from genret.model_store import write_json  # noqa: E402

RUN = "atomic+pq+qp+ai+fz+da"  # genret train's defaults, describe and ask included
BEAM_HUBNESS_WEIGHTS = (0.0, 20.0, 40.0, 80.0)  # each reported: there are no added dev images to choose on
BONUSES = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)  # nats favouring added ids, measured on the added model (GENRET_ADDED_ID_BONUS)
BONUS_HUBNESS_WEIGHTS = (0.0, 40.0)


def train(catalog, setting: dict, run_dir: Path, seed: int) -> Path:
    from genret.training import TrainConfig, Trainer

    model = run_dir / "model"
    if not (model / "manifest.json").exists():
        config = TrainConfig(**{**setting["config"], **run_config(RUN), "seed": seed})
        Trainer(catalog, config, run_dir).train(model)
    return model


def grow(base: Path, added, dest: Path) -> tuple[Path, float]:
    """The base model copied to `dest`, with the `added` catalog's images added to it."""
    from genret.adding import add_images

    timing = dest.parent / "add_seconds.json"
    if not (dest / "manifest.json").exists():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(base, dest)
        started = time.perf_counter()
        add_images(dest, added, progress=False)
        write_json(timing, time.perf_counter() - started)
    return dest, json.loads(timing.read_text())


def measure(model: Path, protocol, setting: dict, seed: int, result_path: Path, bonuses=()) -> dict:
    """Each scope's recall (test, catalog, and with --captioned-queries "captioned": queries for
    trained images, over the catalog), at each hubness prior h and, on the added model, bonus."""
    from genret.decoding import PriorWeights, TransformersEngine
    from genret.evaluation import evaluate_describe_and_ask, evaluate_generative, query_captions
    from genret.model_store import StoredModel

    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    held_out = query_captions(protocol.queries, protocol.test_keys)
    searched = [("test", protocol.queries, protocol.test_keys), ("catalog", protocol.queries, None)]
    if protocol.captioned_queries:
        searched.append(("captioned", protocol.captioned_queries, None))
    scopes = {f"{scope}@{h:g}": (queries, candidates, h) for scope, queries, candidates in searched
              for h in BEAM_HUBNESS_WEIGHTS}
    bonus_scopes = {f"{scope}@{h:g}+bonus{b:g}": (queries, h, b) for scope, queries, _ in searched[1:]
                    for h in BONUS_HUBNESS_WEIGHTS for b in bonuses}
    engine = None
    for scope in [*scopes, "describe_test_images", *bonus_scopes]:
        if scope in result:
            continue
        engine = engine or TransformersEngine(StoredModel.open(model))
        if scope in bonus_scopes:
            queries, h, bonus = bonus_scopes[scope]  # searched as the service does with GENRET_ADDED_ID_BONUS
            result[scope] = evaluate_generative(engine, queries, beams=setting["beams"],
                                                prior=PriorWeights(hubness=h, added_bonus=bonus), progress=False)
        elif scope == "describe_test_images":
            result[scope] = evaluate_describe_and_ask(engine, held_out, seed=seed, progress=False)
        else:
            queries, candidates, h = scopes[scope]
            result[scope] = evaluate_generative(engine, queries, candidates=candidates,
                                                beams=setting["beams"], prior=PriorWeights(hubness=h), progress=False)
        write_json(result_path, result)
    if bonuses and protocol.captioned_queries:
        engine = engine or TransformersEngine(StoredModel.open(model))
        choose_on_held_out_queries(engine, protocol, setting, bonuses, result, result_path)
    return result


def halves(protocol) -> tuple[list, list]:
    """The test queries of the first half of the test images (sorted), and of the rest."""
    first = set(sorted(protocol.test_keys)[: len(protocol.test_keys) // 2])
    return [q for q in protocol.queries if q[1] in first], [q for q in protocol.queries if q[1] not in first]


def choose_on_held_out_queries(engine, protocol, setting: dict, bonuses, result: dict, result_path: Path) -> None:
    """What `genret evaluate --beam-hubness-weights ... --added-bonuses ...` would choose, checked
    on other queries: (h, b) chosen on the mean of both kinds over the first half of the added
    images' captions and the captioned dev queries ("choose@..."), by R@10 first and by R@1 first,
    then the second half and the reported captioned queries searched at those weights and with
    no prior ("held_out_by_R@10", "held_out_by_R@1", "held_out_plain"): each kind's R@1 and R@10,
    and their mean."""
    from genret.decoding import PriorWeights
    from genret.evaluation import chosen_weights, evaluate_generative

    choose_on, report_on = halves(protocol)
    choose_on, report_on = choose_on + protocol.dev_captioned_queries, report_on + protocol.captioned_queries
    search = lambda queries, prior: evaluate_generative(engine, queries, beams=setting["beams"], prior=prior,
                                                        progress=False)
    priors = {f"choose@{h:g}+bonus{b:g}": PriorWeights(hubness=h, added_bonus=b)
              for h in BONUS_HUBNESS_WEIGHTS for b in (0.0, *bonuses)}
    for scope, prior in priors.items():
        if scope not in result:
            result[scope] = search(choose_on, prior)
            write_json(result_path, result)
    chosen = {f"held_out_by_{by}": chosen_weights({prior: result[scope] for scope, prior in priors.items()}, by=by)
              for by in CHOOSE_BY}
    weights = {scope: PriorWeights(hubness=c["beam_hubness_weight"], added_bonus=c["added_bonus"])
               for scope, c in chosen.items()}
    for scope, prior in {"held_out_plain": PriorWeights(), **weights}.items():
        if scope not in result:
            by_kind = search(report_on, prior)["by_kind"]
            result[scope] = {"beam_hubness_weight": prior.hubness, "added_bonus": prior.added_bonus,
                             **{f"{kind} {m}": by_kind[kind][m] for kind in HELD_OUT_KINDS for m in ("R@1", "R@10")}}
            write_json(result_path, result)


CHOOSE_BY = ("R@10", "R@1")  # what the held-out choice maximizes first
HELD_OUT = ("held_out_plain", *(f"held_out_by_{by}" for by in CHOOSE_BY))
HELD_OUT_KINDS = ("uncaptioned", "captioned", "mean")  # added images' queries, trained images', their mean
HELD_OUT_METRICS = tuple(f"{kind} {m}" for kind in HELD_OUT_KINDS for m in ("R@1", "R@10"))
MODELS = {"trained-in": "test images trained in (pseudo-queries)", "added": "test images added, no training"}
METRICS = {"test@0": ("R@1", "R@5", "R@10"), "catalog@0": ("R@1", "R@5", "R@10"),
           **{f"catalog@{h:g}": ("R@10",) for h in BEAM_HUBNESS_WEIGHTS[1:]},
           "describe_test_images": ("describe_word_f1", "yes_no_accuracy")}


def over_seeds(runs: list[dict]) -> dict:
    """scope -> metric -> (mean, standard deviation) over the seeds' results."""
    scopes = {**METRICS, **{scope: ("R@1", "R@10") for scope in runs[0] if scope.startswith("captioned@")},
              **{scope: ("R@10",) for scope in runs[0] if "+bonus" in scope and not scope.startswith("choose@")},
              **{scope: HELD_OUT_METRICS for scope in HELD_OUT if scope in runs[0]}}
    return {scope: {m: (float(np.mean([r[scope][m] for r in runs])), float(np.std([r[scope][m] for r in runs])))
                    for m in metrics} for scope, metrics in scopes.items()}


def report(results: dict, meta: dict) -> str:
    def cell(row: dict, scope: str, metric: str) -> str:
        mean, sd = row[scope][metric]
        return f"{mean:.3f}" + (f" ± {sd:.3f}" if meta["seeds"] > 1 else "")

    def bonus_table(intro: str, cell_of) -> list[str]:
        """A table of the added model by hubness prior h and bonus b; cell_of("@h" or "@h+bonusb")."""
        lines = ["", intro, "", "| hubness prior h | " + " | ".join(f"b = {b:g}" for b in (0.0, *BONUSES)) + " |",
                 "|---|" + "---|" * (len(BONUSES) + 1)]
        for h in BONUS_HUBNESS_WEIGHTS:
            lines.append(f"| {h:g} | " + " | ".join(cell_of(n) for n in (f"@{h:g}", *(f"@{h:g}+bonus{b:g}"
                                                                                        for b in BONUSES))) + " |")
        return lines

    lines = [f"# Images added without training, against the same images trained in ({meta['setting']} setting)", "",
             f"Catalog: {meta['catalog']} images, {meta['added']} of them (the test images) added to a model trained "
             f"on the rest; {meta['queries']} test captions as queries; beam {meta['beams']}; {meta['seeds']} seed(s). "
             f"Adding took {meta['add_seconds']:.1f} s on average. Command: `{meta['command']}` at {meta['commit']}.", "",
             "| model | test R@1 / R@5 / R@10 | catalog R@1 / R@5 / R@10 | catalog R@10, prior h = "
             + " / ".join(f"{h:g}" for h in BEAM_HUBNESS_WEIGHTS[1:]) + " | test images: describe F1 | yes/no |",
             "|---|---|---|---|---|---|"]
    for key, name in MODELS.items():
        row = results[key]
        lines.append(" | ".join([
            f"| {name}", " / ".join(cell(row, "test@0", m) for m in METRICS["test@0"]),
            " / ".join(cell(row, "catalog@0", m) for m in METRICS["catalog@0"]),
            " / ".join(cell(row, f"catalog@{h:g}", "R@10") for h in BEAM_HUBNESS_WEIGHTS[1:]),
            cell(row, "describe_test_images", "describe_word_f1"),
            cell(row, "describe_test_images", "yes_no_accuracy")]) + " |")
    added = results["added"]
    lines += bonus_table("Whole-catalog R@10 of the added model with every added id favoured by b nats inside the "
                         "search (every query seeks an added image, so this measures how far such an offset flatters "
                         "the scope):", lambda n: cell(added, "catalog" + n, "R@10"))
    if "captioned@0" in added:
        lines += ["", f"Queries for trained images (`--captioned-queries`): one held-out caption of each of "
                  f"{meta['captioned_queries']} train images, over the whole catalog. R@1 / R@10 at each hubness "
                  "prior h, for each model:", "",
                  "| model | " + " | ".join(f"h = {h:g}" for h in BEAM_HUBNESS_WEIGHTS) + " |",
                  "|---|" + "---|" * len(BEAM_HUBNESS_WEIGHTS)]
        for key, name in MODELS.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{cell(results[key], f'captioned@{h:g}', 'R@1')} / {cell(results[key], f'captioned@{h:g}', 'R@10')}"
                for h in BEAM_HUBNESS_WEIGHTS) + " |")
        mean = lambda n: (added["captioned" + n]["R@10"][0] + added["catalog" + n]["R@10"][0]) / 2
        lines += bonus_table("The added model's R@10 for those queries with every added id favoured by b nats, and "
                             "the mean of the two kinds' R@10 (the test queries' from the bonus table above):",
                             lambda n: f"{cell(added, 'captioned' + n, 'R@10')} (mean {mean(n):.3f})")
    if HELD_OUT[1] in added:
        chosen = " ".join(f"By {by}: " + "; ".join(f"h = {h:g}, b = {b:g}" for h, b in meta["held_out_weights"][by])
                          + "." for by in CHOOSE_BY)
        lines += ["", "Weights chosen as `genret evaluate --beam-hubness-weights --added-bonuses [--choose-by]` "
                  "chooses (best mean of the two kinds, by R@10 first or by R@1 first) on held-out queries: the "
                  "captions of the first half of the added images and the captioned dev queries. Chosen per seed: "
                  f"{chosen} Searched on the other half of the added images and the reported captioned queries, "
                  "R@1 / R@10:", "",
                  "| search | added images | trained images | mean of the two |", "|---|---|---|---|"]
        names = {"held_out_plain": "no prior", **{f"held_out_by_{by}": f"at the h, b chosen by {by}" for by in CHOOSE_BY}}
        for scope, name in names.items():
            lines.append(f"| {name} | " + " | ".join(f"{cell(added, scope, f'{kind} R@1')} / "
                                                    f"{cell(added, scope, f'{kind} R@10')}"
                                                    for kind in HELD_OUT_KINDS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="cpu", choices=sorted(SETTINGS))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seeds", type=int, default=1, help="train and measure seeds 0 to N-1")
    parser.add_argument("--captioned-queries", action="store_true",
                        help="also queries for trained images: held-out captions of train images (flickr8k.py's)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: train at least one seed")
    if not (args.data / "captions.csv").exists():
        print(f"no Flickr8k at {args.data} (set --data or GENRET_FLICKR8K)", file=sys.stderr)
        return 2
    suffix = "-captioned" if args.captioned_queries else ""
    out = args.out or REPO / "benchmarks" / "results" / f"add-images-{args.setting}{suffix}"
    chosen = {"captioned_queries": args.captioned_queries}
    if protocol_of(out, any(out.glob("seed*"))) not in (None, chosen):
        parser.error(f"{out} holds models trained {'without' if args.captioned_queries else 'with'} "
                     "--captioned-queries: give this protocol its own --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "protocol.json", chosen)
    setting = SETTINGS[args.setting]
    protocol = build_catalog(args.data, setting, captioned_queries=args.captioned_queries)
    test = set(protocol.test_keys)
    runs, add_seconds = {key: [] for key in MODELS}, []
    for seed in range(args.seeds):
        where = out / f"seed{seed}"
        where.mkdir(parents=True, exist_ok=True)
        base = train(protocol.catalog.subset(k for k in protocol.catalog.keys() if k not in test), setting,
                     where / "base", seed)
        models = {"trained-in": train(protocol.catalog, setting, where / "trained-in", seed)}
        models["added"], seconds = grow(base, protocol.catalog.subset(test), where / "added" / "model")
        add_seconds.append(seconds)
        for key, model in models.items():
            runs[key].append(measure(model, protocol, setting, seed, where / f"{key}.json",
                                     BONUSES if key == "added" else ()))
    results = {key: over_seeds(seeds) for key, seeds in runs.items()}
    commit = os.popen(f"git -C {REPO} rev-parse --short HEAD").read().strip()
    meta = {"setting": args.setting, "run": RUN, "seeds": args.seeds, "catalog": len(protocol.catalog),
            "added": len(test), "queries": len(protocol.queries), "beams": setting["beams"],
            "captioned_queries": len(protocol.captioned_queries),
            "held_out_weights": {by: [(r[f"held_out_by_{by}"]["beam_hubness_weight"],
                                       r[f"held_out_by_{by}"]["added_bonus"]) for r in runs["added"]
                                      if f"held_out_by_{by}" in r] for by in CHOOSE_BY},
            "add_seconds": float(np.mean(add_seconds)), "commit": commit,
            "command": f"python benchmarks/add_images.py --setting {args.setting} --seeds {args.seeds}"
                       + (" --captioned-queries" if args.captioned_queries else "")}
    write_json(out / "results.json", {"meta": meta, "results": results, "runs": runs})
    (out / "results.md").write_text(report(results, meta))
    print(report(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
