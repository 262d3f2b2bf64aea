"""`genret`: train on a catalog, add images to it, list models, evaluate, search, describe, ask, and the demo.

Errors a user can cause (bad catalog, unknown model or image, bad option) end in one clear
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import genret

from .identifiers import SCHEMES

if TYPE_CHECKING:
    from .decoding import PriorWeights

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
MODEL_STORE = genret.MODEL_STORE  # a module global, so tests can point it elsewhere
RUNS = Path(os.environ.get("GENRET_RUNS", REPO / "runs"))

# Named starting points; any field can still be changed with --set key=value.
PRESETS: dict[str, dict] = {
    # seconds on a CPU: enough to memorize a few dozen images (tests, the demo)
    "tiny": dict(num_layers=2, memorize_epochs=6, retrieve_epochs=30, batch_size=16, lr=2e-3,
                 prefix_lr=3e-3, align_epochs=60, scheme_options={}),
    # a CPU-sized model for hundreds of images
    "cpu": dict(num_layers=4, memorize_epochs=4, retrieve_epochs=12, batch_size=32, lr=1e-3, prefix_lr=2e-3),
    # the whole SmolLM2-135M, for a GPU
    "full": dict(num_layers=None, prune_vocab=False, memorize_epochs=4, retrieve_epochs=10, batch_size=128,
                 lr=3e-4, prefix_lr=1e-3),
}


class UsageError(Exception):
    pass


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that takes options between its positionals, as in
    `genret search MODEL -k 3 "a dog"`: plain argparse gives the queries to `query` while it
    parses MODEL, finds none there, and then refuses "a dog" as unrecognized."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args calls back here for each of its passes
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def number_arg(kind: type, minimum: float, what: str) -> Callable[[str], float]:
    """An argparse type: a finite number of `kind` (int or float), at least `minimum`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not minimum <= value < float("inf"):  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


# re-ranking and hubness weights; counts of results, beams or queries; --time-budget (0: one epoch)
weight_arg = number_arg(float, 0, "a weight (a finite number >= 0)")
count_arg = number_arg(int, 1, "a count (an integer >= 1)")
seconds_arg = number_arg(float, 0, "a time budget (a finite number of seconds >= 0)")


def model_name_arg(text: str) -> str:
    """An argparse type: a model's name, one folder under the model store (--out takes a path)."""
    if text in ("", ".", "..") or text.startswith(".") or Path(text).name != text or "\\" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a model name: a folder name under the model store, not a "
                                         "path (--out takes a path)")
    return text


def text_arg(text: str) -> str:
    """An argparse type: a query or question, not blank (the service refuses one too)."""
    from .catalog import is_blank

    if not text.strip():
        raise argparse.ArgumentTypeError("it is empty")
    if is_blank(text):
        raise argparse.ArgumentTypeError("it has no visible characters, only control or zero-width ones")
    try:  # bytes the locale could not decode arrive as lone surrogates, which the tokenizer refuses
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("it is not valid UTF-8 text") from None
    return text


def add_prior_args(parser: argparse.ArgumentParser) -> None:
    """The options of genret.decoding.PriorWeights: what the beam search itself adds to ids' scores."""
    parser.add_argument("--beam-hubness-weight", type=weight_arg, default=0.0, metavar="H",
                        help="search by log-probability minus H x each image's hubness, inside the beam (default 0)")
    parser.add_argument("--added-bonus", type=weight_arg, default=0.0, metavar="B",
                        help="add B nats to the score of each image added after training (`genret add`), inside "
                             "the beam (default 0)")


def prior_weights(args) -> PriorWeights:
    from .decoding import PriorWeights

    return PriorWeights(hubness=args.beam_hubness_weight, added_bonus=args.added_bonus)


def parse_sets(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"--set takes key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_config(preset: str, scheme: str | None, sets: list[str]):
    from pydantic import ValidationError

    from .training import TrainConfig

    values = dict(PRESETS[preset])
    if scheme:
        values["scheme"] = scheme
    values.update(parse_sets(sets))
    try:
        return TrainConfig(**values)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(map(str, error["loc"]))
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(where, TrainConfig.model_fields, n=3)
            raise UsageError(f"unknown training option {where!r}"
                             + (f" (did you mean {' or '.join(close)}?)" if close else
                                f"; the options: {', '.join(TrainConfig.model_fields)}")) from None
        raise UsageError(f"bad training config: {where + ': ' if where else ''}{error['msg']}") from None


def open_model(name_or_path: str):
    from .model_store import StoredModel

    return StoredModel.find(name_or_path, MODEL_STORE)


def read_queries(path: Path) -> list[tuple[str, str]]:
    """Queries as an `image,caption` CSV: each caption should retrieve its image."""
    from .catalog import csv_delimiter, image_key, is_blank, read_utf8

    if not path.is_file():
        raise UsageError(f"{path}: no such queries file")
    text = read_utf8(path)
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f, delimiter=csv_delimiter(text))
        rows = list(reader)
    if not {"image", "caption"} <= set(reader.fieldnames or []):
        raise UsageError(f"{path}: expected an image,caption CSV")
    if not rows:
        raise UsageError(f"{path}: no queries")
    blank = [row for row, r in enumerate(rows, start=2) if is_blank(r["caption"] or "") or not r["image"]]
    if blank:
        raise UsageError(f"{path}: row {blank[0]} has an empty image or caption")
    return [(r["caption"], image_key(r["image"])) for r in rows]


def cmd_train(args) -> None:
    from .catalog import load_catalog, read_split
    from .encoders import usable_device
    from .training import Trainer, clear_run

    config = build_config(args.preset, args.scheme, args.set)
    usable_device(config.device)  # before a big catalog is read, or --fresh clears a run
    catalog = load_catalog(args.images, args.captions, fmt=args.format, duplicates=args.duplicates)
    if args.hold_out:
        held = read_split(args.hold_out)
        present = [k for k in held if k in catalog]
        if len(present) < len(held):  # a split of a bigger catalog, or the wrong file: say which
            missing = [k for k in held if k not in catalog]
            print(f"note: {len(missing)} of the {len(held)} keys in {args.hold_out} are not in the catalog, e.g. "
                  f"{missing[:3]}; the other {len(present)} are held out", file=sys.stderr)
        catalog = catalog.without_captions_for(present)
    run_dir = Path(args.run_dir) if args.run_dir else RUNS / args.name
    if args.fresh:
        clear_run(run_dir)
    dest = Trainer(catalog, config, run_dir).train(Path(args.out) if args.out else MODEL_STORE / args.name,
                                                   time_budget_s=args.time_budget)
    print(f"model saved to {dest}" if dest else f"stopped at the time budget; rerun to resume from {run_dir}")


def cmd_add(args) -> None:
    from .adding import add_images
    from .catalog import load_catalog, load_image_folder

    stored = open_model(args.model)
    if args.captions:
        images = load_catalog(args.images, args.captions, fmt=args.format, duplicates=args.duplicates)
    else:
        images = load_image_folder(args.images)
    added = add_images(stored.path, images, device=args.device)
    name = stored.name
    if not added.keys:
        print(f"nothing to add: all {len(added.already_there)} images are already in {name}")
        return
    skipped = f" ({len(added.already_there)} already there)" if added.already_there else ""
    print(f"added {len(added.keys)} images to {name}{skipped} in {added.seconds:.1f} s; restart its server "
          "(and rerun `python -m service.publish` where ids are served from Redis) to serve them")


def read_lines(path: str, what: str) -> list[str]:
    """A file of `what` (image keys, queries), one per line, or stdin for "-"; blank lines are
    skipped and repeats are fine (lists get concatenated)."""
    from .catalog import is_blank

    return [line.strip() for line in _all_lines(path, what) if not is_blank(line)]


def _all_lines(path: str, what: str) -> list[str]:
    from .catalog import read_utf8

    if path == "-":
        return sys.stdin.read().splitlines()
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such {what} file")
    return read_utf8(Path(path)).splitlines()


def read_questions(path: str) -> list[tuple[str, str]]:
    """(image key, question) pairs, one per line as `key<TAB>question` (what `genret describe`
    prints for several images, with the description swapped for a question); blank lines are
    skipped, and a bad line is named by its number."""
    pairs = []
    for number, line in enumerate(_all_lines(path, "questions"), 1):
        if not line.strip():
            continue
        key, tab, question = line.partition("\t")
        if not tab or not key.strip():
            raise UsageError(f"{path}: line {number}: expected an image key, a tab, then the question; got {line!r}")
        try:
            pairs.append((key.strip(), text_arg(question).strip()))
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"{path}: line {number}: the question: {e}") from None
    return pairs


def cmd_remove(args) -> None:
    from .removing import remove_images

    keys = [*args.keys, *(read_lines(args.keys_file, "keys") if args.keys_file else [])]
    if not keys:
        raise UsageError("name the images to remove: keys, or --keys-file")
    stored = open_model(args.model)
    removed = remove_images(stored.path, keys)
    name = stored.name
    not_there = (f"{len(removed.not_there)} not in it: {', '.join(removed.not_there[:5])}"
                 + (" ..." if len(removed.not_there) > 5 else "")) if removed.not_there else ""
    if not removed.keys:
        print(f"nothing to remove from {name}: {not_there}")
        return
    print(f"removed {len(removed.keys)} images from {name}{f' ({not_there})' if not_there else ''} in "
          f"{removed.seconds:.1f} s; restart its server (and rerun `python -m service.publish` where ids are "
          "served from Redis) to stop serving them")


def cmd_evaluate(args) -> None:
    from .catalog import read_split
    from .decoding import EmbeddingReranker, PriorWeights, TransformersEngine
    from .evaluation import (check_candidates, chosen_weights, evaluate_describe_and_ask, evaluate_generative,
                             query_captions)

    stored = open_model(args.model)
    if args.out and (Path(args.out).is_dir() or not Path(args.out).parent.is_dir()):  # known now, not after the searches
        raise UsageError(f"--out {args.out}: " + ("a folder; name the JSON file to write" if Path(args.out).is_dir()
                                                  else "its folder does not exist"))
    queries = read_queries(Path(args.queries))
    if args.limit:
        queries = queries[: args.limit]
    candidates = read_split(args.candidates) if args.candidates else None
    if candidates is not None:
        unknown = [key for key in candidates if key not in stored.id_tokens]
        if unknown or not candidates:
            raise UsageError(f"{args.candidates}: " + (f"{len(unknown)} keys are not in model {stored.name}, "
                                                       f"e.g. {unknown[:3]}" if unknown else "no keys"))
    check_candidates(stored.trie(candidates), queries)
    if args.describe_and_ask:
        stored.require_trained_to("describe")
        stored.require_trained_to("ask")
    engine = TransformersEngine(stored, device=args.device)
    grid = []  # every (weight, hubness weight) pair asked for, from the same beams
    if args.rerank_weights or args.hubness_weights:
        grid = [(w, h) for w in args.rerank_weights or [args.rerank_weight]
                for h in args.hubness_weights or [args.hubness_weight]]
    reranker = (EmbeddingReranker(stored, weight=args.rerank_weight, device=engine.device,
                                  hubness_weight=args.hubness_weight) if args.rerank or grid else None)
    # every beam prior asked for: one search each
    priors = [PriorWeights(hubness=h, added_bonus=b) for h in args.beam_hubness_weights or [args.beam_hubness_weight]
              for b in args.added_bonuses or [args.added_bonus]]
    by_prior = {prior: evaluate_generative(engine, queries, candidates=candidates, beams=args.beams,
                                           reranker=reranker, rerank_grid=grid, prior=prior) for prior in priors}
    if len(priors) == 1:
        [result] = by_prior.values()
    else:
        result = {"by_prior": {f"{p.hubness:g},{p.added_bonus:g}": r for p, r in by_prior.items()}}
    if args.describe_and_ask:  # each query's image described by its id alone, against its queries as references
        result["describe_and_ask"] = evaluate_describe_and_ask(engine, query_captions(queries))
    result["model"] = stored.name
    if len(priors) > 1 or len(grid) > 1:
        result["chosen"] = chosen_weights(by_prior, by=args.choose_by)
    print(json.dumps(result, indent=1))
    kinds = next(iter(by_prior.values()))["query_kinds"]
    one_kind = [kind for kind, n in kinds.items() if n == len(queries)]
    if one_kind and (any(priors) or args.hubness_weight or args.hubness_weights):
        never = "never " if one_kind == ["uncaptioned"] else ""
        print(f"note: all {len(queries)} queries seek images whose captions were {never}trained on; hubness "
              "weights and added-id bonuses chosen on them alone favour such images: choose them on queries of "
              "both kinds, in the mix your users send (see the README)", file=sys.stderr)
    if "chosen" in result:
        chosen = result["chosen"]
        recalls = ", ".join(f"R@{k} {chosen[f'R@{k}']:.3f}" for k in (1, 5, 10))
        print(f"best by {chosen['by']} on the {chosen['on']} ({recalls}): serve with "
              + serving_settings(chosen, args.beams), file=sys.stderr)
    if args.out:  # whole or not at all, as every file the project writes: a Ctrl-C mid-write keeps the old one
        from .model_store import write_json

        write_json(Path(args.out), result)


def serving_settings(chosen: dict, beams: int) -> str:
    """The service's environment settings that search as the chosen weights were evaluated."""
    reranked = "rerank_weight" in chosen
    env = {"GENRET_RERANK_BEAMS" if reranked else "GENRET_BEAMS": beams,
           "GENRET_BEAM_HUBNESS_WEIGHT": chosen["beam_hubness_weight"], "GENRET_ADDED_ID_BONUS": chosen["added_bonus"]}
    if reranked:
        env.update(GENRET_RERANK_WEIGHT=chosen["rerank_weight"], GENRET_HUBNESS_WEIGHT=chosen["hubness_weight"])
    return " ".join(f"{name}={value:g}" for name, value in env.items())


def cmd_search(args) -> None:
    from .decoding import EmbeddingReranker, TransformersEngine, search_prior

    if [args.queries, args.within, args.exclude].count("-") > 1:
        raise UsageError("only one of --queries, --within and --exclude can read stdin: give the others a file")
    queries = [*args.query, *(read_lines(args.queries, "queries") if args.queries else [])]
    if not queries:
        raise UsageError("give a query, or --queries FILE (one per line; - reads stdin)")
    stored = open_model(args.model)
    # the images to search: checked before the LM loads, and one trie for every batch
    within = exclude = None
    if args.within and not (within := read_lines(args.within, "keys")):
        raise UsageError(f"{args.within}: no image keys to search within")
    if args.exclude:
        exclude = read_lines(args.exclude, "keys")  # an empty file leaves nothing out
    try:
        trie = stored.trie(within, exclude) if within or exclude else None
    except ValueError as e:  # exclude leaves no image
        raise UsageError(str(e)) from None
    engine = TransformersEngine(stored, device=args.device)
    prior = search_prior(stored, prior_weights(args), trie)
    reranker = EmbeddingReranker(stored, weight=args.rerank_weight, device=engine.device,
                                 hubness_weight=args.hubness_weight) if args.rerank else None
    batch_size = 16  # as evaluation's: a batch is one beam search, each query's prompt `beams` times
    headed = len(queries) > 1 and not args.json
    for start in range(0, len(queries), batch_size):
        batch = queries[start : start + batch_size]
        hits = engine.search(batch, k=args.k, beams=args.beams, trie=trie, prior=prior)
        if reranker is not None:
            hits = reranker(batch, hits)
        for query, row in zip(batch, hits):
            if args.json:
                print(json.dumps({"query": query, "results": [
                    {"image_id": h.key, "score": round(h.score, 4), "id": stored.identifiers.ids[h.key]} for h in row]},
                    ensure_ascii=False), flush=True)
                continue
            if headed:
                print(f"# {query}")
            for hit in row:
                print(f"{hit.score:9.3f}  {hit.key}  {stored.identifiers.ids[hit.key]}")
            if headed:
                print(flush=True)


def cmd_describe(args) -> None:
    from tqdm.auto import tqdm

    from .decoding import TransformersEngine

    stored = open_model(args.model)
    stored.require_trained_to("describe")  # both checked before the LM loads
    keys = list(dict.fromkeys([*args.image, *(read_lines(args.keys_file, "keys") if args.keys_file else []),
                               *(stored.keys if args.all else [])]))
    if not keys:
        raise UsageError("name the images to describe: keys, --keys-file, or --all")
    for key in keys:
        stored.image_id_tokens(key)
    engine = TransformersEngine(stored, device=args.device)
    batch_size = 16
    for start in tqdm(range(0, len(keys), batch_size), desc="describe", unit="batch", disable=len(keys) <= batch_size):
        batch = keys[start : start + batch_size]
        for key, description in zip(batch, engine.describe_many(batch)):
            if args.json:
                print(json.dumps({"image_id": key, "description": description}, ensure_ascii=False), flush=True)
            else:
                print(description if len(keys) == 1 else f"{key}\t{description}", flush=True)


def cmd_ask(args) -> None:
    from tqdm.auto import tqdm

    from .decoding import TransformersEngine

    if (args.image is None) != (args.question is None):
        raise UsageError("give an image and a question about it, or --questions FILE")
    questions = [*([(args.image, args.question)] if args.image is not None else []),
                 *(read_questions(args.questions) if args.questions else [])]
    if not questions:
        raise UsageError("give an image and a question about it, or --questions FILE (key<TAB>question per line; "
                         "- reads stdin)")
    stored = open_model(args.model)
    stored.require_trained_to("ask")  # all checked before the LM loads
    for key, _ in questions:
        stored.image_id_tokens(key)
    engine = TransformersEngine(stored, device=args.device)
    batch_size = 64  # as evaluation's: a few answer tokens each
    for start in tqdm(range(0, len(questions), batch_size), desc="ask", unit="batch",
                      disable=len(questions) <= batch_size):
        batch = questions[start : start + batch_size]
        for (key, question), answer in zip(batch, engine.answer_many(batch), strict=True):
            if args.json:
                print(json.dumps({"image_id": key, "question": question, "answer": answer.text,
                                  "yes_probability": answer.yes_probability}, ensure_ascii=False), flush=True)
                continue
            leaning = "" if answer.yes_probability is None else f" (P(yes) {answer.yes_probability:.2f})"
            print(f"{answer.text}{leaning}" if len(questions) == 1 else f"{key}\t{question}\t{answer.text}{leaning}",
                  flush=True)


def cmd_models(args) -> None:
    """The models in the store, one line each (or JSON): the names `genret search` and the
    service take. Folders that are not models are named on stderr, with the reason."""
    from .model_store import ModelStoreError, list_models

    found = list_models(MODEL_STORE)
    models = [model.summary() for _, model in found if not isinstance(model, ModelStoreError)]
    if args.json:
        print(json.dumps(models + [{"path": str(folder), "error": str(error)} for folder, error in found
                                   if isinstance(error, ModelStoreError)], indent=2))
        return
    for _, error in found:
        if isinstance(error, ModelStoreError):
            print(f"not a model: {error}", file=sys.stderr)
    if not models:
        print(f"no models in {MODEL_STORE}: train one with `genret train` (or `genret demo`)")
        return
    rows = [("name", "scheme", "images", "tasks", "created", "changed", "size")]
    for s in models:
        images = str(s["images"]) + (f" ({s['trained_images']} trained)" if s["images"] != s["trained_images"] else "")
        # a symlink (model_store/current -> v3) is listed as what it points to
        name = s["name"] if s["folder"] == s["name"] else f"{s['folder']} -> {s['name']}"
        rows.append((name, s["scheme"], images, ",".join(s["tasks"]), s["created"] or "-", s["changed"] or "-",
                     f"{s['bytes'] / 1e6:.0f} MB"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def cmd_demo(args) -> None:
    """The main job on the embedded catalog: train the demo model once, then retrieve with it."""
    from .catalog import load_catalog
    from .decoding import TransformersEngine
    from .demo_catalog import demo_queries, write_demo_catalog
    from .evaluation import recall
    from .training import Trainer, clear_run

    dest = MODEL_STORE / args.name
    if not (dest / "manifest.json").exists() or args.retrain:
        images, captions = write_demo_catalog(REPO / ".cache" / "demo_catalog")
        catalog = load_catalog(images, captions)
        config = build_config("tiny", args.scheme, args.set)
        if args.retrain:  # else a finished run's checkpoint would be saved again, untrained
            clear_run(RUNS / args.name)
        print(f"training the demo model ({len(catalog)} images, scheme {config.scheme}) into {dest} ...")
        Trainer(catalog, config, RUNS / args.name).train(dest)
    stored = open_model(str(dest))
    engine = TransformersEngine(stored, device=args.device)
    queries = demo_queries()
    hits = engine.search([q for q, _ in queries], k=5, beams=5)
    for (query, target), row in zip(queries, hits):
        mark = "ok " if row and row[0].key == target else "-- "
        print(f"{mark} {query!r:60} -> {', '.join(h.key for h in row[:3])}")
    print(json.dumps(recall([[h.key for h in row] for row in hits], [t for _, t in queries], ks=(1, 5))))
    key = stored.catalog.keys()[0]
    if "describe" in stored.tasks:
        print(f"describe {key}: {engine.describe(key)}")
    if "ask" in stored.tasks:
        print(f"ask {key} 'What is in this image?': {engine.ask(key, 'What is in this image?')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genret", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)

    p = sub.add_parser("train", help="train a model on a catalog into model_store/<name>")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--captions", required=True, help="image,caption CSV or COCO captions JSON")
    p.add_argument("--format", default="auto", choices=["auto", "csv", "coco"])
    p.add_argument("--duplicates", default="error", choices=["error", "keep", "drop"],
                   help="what to do with repeated (image, caption) rows")
    p.add_argument("--name", required=True, type=model_name_arg)
    p.add_argument("--scheme", choices=list(SCHEMES),
                   help="identifier scheme (default: atomic, with rows aligned and frozen; see README)")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a training config field")
    p.add_argument("--hold-out", help="file of image keys whose captions are not trained on (they stay memorized)")
    p.add_argument("--run-dir", help="checkpoint folder (default runs/<name>); rerun to resume")
    p.add_argument("--out", help="model folder (default model_store/<name>)")
    p.add_argument("--fresh", action="store_true", help="discard an earlier run's checkpoints")
    p.add_argument("--time-budget", type=seconds_arg, metavar="SECONDS",
                   help="stop at the first epoch boundary after this long (resume by rerunning)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("add", help="add new images to a trained model, without training (atomic ids)")
    p.add_argument("model")
    p.add_argument("--images", required=True, help="folder of images; those the model lacks are added")
    p.add_argument("--captions", help="image,caption CSV or COCO captions JSON (stored for display, not trained on)")
    p.add_argument("--format", default="auto", choices=["auto", "csv", "coco"])
    p.add_argument("--duplicates", default="error", choices=["error", "keep", "drop"],
                   help="what to do with repeated (image, caption) rows")
    p.add_argument("--device")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("remove", help="remove images from a trained model, without training (any scheme)")
    p.add_argument("model")
    p.add_argument("keys", nargs="*", metavar="KEY", help="image keys to remove")
    p.add_argument("--keys-file", help="a file of image keys, one per line (repeats are fine; - reads stdin)")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("evaluate", help="Recall@1/5/10 of held-out queries")
    p.add_argument("model")
    p.add_argument("--queries", required=True, help="image,caption CSV of held-out queries")
    p.add_argument("--candidates", help="file of keys to search among (default: the whole catalog)")
    p.add_argument("--beams", type=count_arg, default=10)
    p.add_argument("--rerank", action="store_true", help="also report re-ranking with the two-tower")
    p.add_argument("--rerank-weight", type=weight_arg, default=10.0, metavar="W",
                   help="re-ranked score: log-probability + W x query-image similarity (default 10)")
    p.add_argument("--hubness-weight", type=weight_arg, default=0.0, metavar="H",
                   help="re-ranked score also minus H x the image's hubness (default 0; see genret.alignment.hubness)")
    p.add_argument("--rerank-weights", type=weight_arg, nargs="+", metavar="W",
                   help="also report recall re-ranked at each of these weights, from the same beams "
                        "(choose the weight on held-out queries, not on the ones you report)")
    p.add_argument("--hubness-weights", type=weight_arg, nargs="+", metavar="H",
                   help="also report recall at each of these hubness weights (with --rerank-weights, every pair)")
    add_prior_args(p)
    p.add_argument("--beam-hubness-weights", type=weight_arg, nargs="+", metavar="H",
                   help="search once at each of these beam hubness weights (with --added-bonuses, every pair)")
    p.add_argument("--added-bonuses", type=weight_arg, nargs="+", metavar="B",
                   help="search once at each of these added-id bonuses")
    p.add_argument("--choose-by", choices=["R@1", "R@5", "R@10"], default="R@10",
                   help="the recall the reported choice maximizes first, then the others (default R@10)")
    p.add_argument("--describe-and-ask", action="store_true",
                   help="also describe each query's image by its id alone, scored against its query captions "
                        "(content-word F1, exact share), and answer yes/no questions built from them (accuracy, AUC "
                        "of the leaning); needs a model trained to describe and ask")
    p.add_argument("--limit", type=count_arg, help="evaluate the first N queries only")
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--device")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("search", help="top-k images for text queries")
    p.add_argument("model")
    p.add_argument("query", type=text_arg, nargs="*", help="one or more queries (quote each)")
    p.add_argument("--queries", metavar="FILE", help="more queries, one per line; - reads them from stdin")
    p.add_argument("--within", metavar="FILE",
                   help="search these images alone: their keys, one per line (- reads stdin)")
    p.add_argument("--exclude", metavar="FILE",
                   help="leave these images out (hits already seen): their keys, one per line (- reads stdin); "
                        "keys the model lacks are ignored")
    p.add_argument("--json", action="store_true",
                   help="one JSON line per query: {query, results: [{image_id, score, id}]}")
    p.add_argument("-k", type=count_arg, default=5, help="images per query (default 5)")
    p.add_argument("--beams", type=count_arg, help="beam width (at least k, the default)")
    p.add_argument("--rerank", action="store_true", help="re-rank the beam with the two-tower")
    p.add_argument("--rerank-weight", type=weight_arg, default=10.0, metavar="W",
                   help="re-ranked score: log-probability + W x query-image similarity (default 10)")
    p.add_argument("--hubness-weight", type=weight_arg, default=0.0, metavar="H",
                   help="re-ranked score also minus H x the image's hubness (default 0)")
    add_prior_args(p)
    p.add_argument("--device")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("describe", help="describe memorized images from their ids alone")
    p.add_argument("model")
    p.add_argument("image", nargs="*", help="image keys (one prints its description alone; more print key<TAB>description)")
    p.add_argument("--keys-file", help="more image keys, one per line (- reads stdin)")
    p.add_argument("--all", action="store_true", help="every image in the model")
    p.add_argument("--json", action="store_true", help="one JSON line per image: {image_id, description}")
    p.add_argument("--device")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("ask", help="answer a question about a memorized image")
    p.add_argument("model")
    p.add_argument("image", nargs="?")
    p.add_argument("question", nargs="?", type=text_arg)
    p.add_argument("--questions", metavar="FILE",
                   help="more questions, one per line as image key<TAB>question (- reads stdin); prints "
                        "key<TAB>question<TAB>answer for each")
    p.add_argument("--json", action="store_true",
                   help="one JSON line per question: {image_id, question, answer, yes_probability}, as POST /ask")
    p.add_argument("--device")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("models", help="list the trained models in the model store")
    p.add_argument("--json", action="store_true", help="print each model's summary as JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="train the demo model if needed, then retrieve with it")
    p.add_argument("--name", default="demo", type=model_name_arg)
    p.add_argument("--scheme", choices=list(SCHEMES), help="identifier scheme (default: atomic)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--retrain", action="store_true", help="train from scratch even where the model exists")
    p.add_argument("--device")
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from .catalog import CatalogError
    from .model_store import ModelStoreError

    try:
        args.func(args)
    except (UsageError, CatalogError, ModelStoreError, ValueError, OSError) as e:  # OSError: a path it cannot use
        print(f"genret {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C; training writes its run folder and the model atomically
        resume = {"train": "; run the same command to resume after the last finished epoch",
                  "demo": "; `genret demo` resumes its training after the last finished epoch"}.get(args.command, "")
        print(f"\ngenret {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
