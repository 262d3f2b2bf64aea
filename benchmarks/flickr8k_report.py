"""The Flickr8k benchmark's report: runs that differ only in their seed folded into one row
(mean and spread), then results.json, the markdown tables of results.md and recall.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flickr8k_protocol import (BEAM_HUBNESS_WEIGHTS, CAPTIONED_PRIOR_FROM, CAPTIONED_RERANK_FROM, CAPTIONED_SCOPES,
                               DENSE_HUBNESS, DEV_SCOPE_OF, HUBNESS_WEIGHTS, PRIOR_SCOPES, RECALL_SCOPES,
                               RERANK_WEIGHTS, SPOKEN_SCOPES)
from genret.model_store import write_json

def over_seeds(runs: list[dict]) -> dict:
    """One row from runs that differ only in their training seed: each recall's mean, and its
    standard deviation under "spread" (run-to-run variance is large at the reduced size)."""
    if len(runs) == 1:
        return runs[0]
    row = {"seeds": [r.get("seed", 0) for r in runs], "spread": {}}
    row["dev_weights"] = {scope: [_weights_of(r[scope]["reranked_dev"]) for r in runs] for scope in DEV_SCOPE_OF
                          if all("reranked_dev" in r.get(scope, {}) for r in runs)}
    row["fair_weights"] = {scope: [_weights_of(r[scope]["reranked_fair"]) for r in runs]
                           for scope in CAPTIONED_RERANK_FROM["reranked_fair"]
                           if all("reranked_fair" in r.get(scope, {}) for r in runs)}
    row["beam_hubness_weights"] = {scope: [r[scope]["beam_hubness_weight"] for r in runs]
                                   for scope in (*PRIOR_SCOPES, *CAPTIONED_PRIOR_FROM) if all(scope in r for r in runs)}
    for scope in [s for s in (*RECALL_SCOPES, *PRIOR_SCOPES, *CAPTIONED_SCOPES, *SPOKEN_SCOPES)
                  if all(s in r for r in runs)]:
        row[scope], row["spread"][scope] = {}, {}
        for part in (None, "reranked", "reranked_dev", "reranked_fair"):
            values = [r[scope] if part is None else r[scope].get(part) for r in runs]
            if any(v is None for v in values):
                continue
            for metric in [m for m in values[0] if all(isinstance(v.get(m), (int, float)) for v in values)]:
                numbers = np.array([v[metric] for v in values], dtype=float)
                target = row[scope] if part is None else row[scope].setdefault(part, {})
                target[metric] = float(numbers.mean())
                if metric.startswith("R@") or metric.endswith(("_f1", "_accuracy", "_auc", "_by_description")):
                    row["spread"][scope][metric if part is None else f"{part} {metric}"] = float(numbers.std())
    return row


def _cell(row: dict, scope: str, metric: str, part: str | None = None) -> str:
    values = row.get(scope, {})
    value = values.get(metric) if part is None else values.get(part, {}).get(metric)
    if value is None:
        return ""
    spread = row.get("spread", {}).get(scope, {}).get(metric if part is None else f"{part} {metric}")
    return f"{value:.3f}" + ("" if spread is None else f" ± {spread:.3f}")


def _yes_no_details(row: dict, scope: str, metric: str) -> str:
    """The yes/no cell's additions: for a model that reads its own description, its accuracy on the
    questions that description answers; how often the model said yes (the truth: half the time); how
    well its leaning ranks the questions (AUC); and "yes iff its own description says the word"."""
    if metric != "yes_no_accuracy":
        return ""
    details = [f"{cell} {what}" for key, what in (("yes_no_stated_accuracy", "stated"), ("yes_share", "yes"),
                                                  ("yes_no_auc", "AUC"), ("yes_no_by_description", "by description"))
               if (cell := _cell(row, scope, key))]
    return f" ({', '.join(details)})" if details else ""


def _label(name: str, row: dict) -> str:
    return name + (f" ({len(row['seeds'])} seeds)" if "seeds" in row else "")


def _weights_of(reranked_dev: dict) -> list[float]:
    return [reranked_dev["weight"], reranked_dev.get("hubness_weight", 0.0)]


def _dev_weights(row: dict, scope: str) -> str:
    """The re-ranking weights "w, h" (one pair per seed) the dev queries chose for a scope; for
    the dense baseline's hubness correction, its beta."""
    dense = row.get(scope.removesuffix("_wide"), {})
    if "hubness_beta" in dense:
        return f"β {dense['hubness_beta']:g}"
    chosen = row.get(scope, {}).get("reranked_dev")
    pairs = row.get("dev_weights", {}).get(scope) or ([_weights_of(chosen)] if chosen else [])
    return " / ".join(f"{w:g}, {h:g}" for w, h in pairs)


def _captioned_rows(r: dict, meta: dict) -> list[list[str]]:
    """The captioned-queries table's rows for one result: [ranking, chosen on, weight, 7 cells]."""
    def cells(uncaptioned: str, captioned: str, part: str | None = None) -> list[str]:
        values = [_cell(r, scope, k, part) for scope in (uncaptioned, captioned) for k in ("R@1", "R@5", "R@10")]
        tens = [r.get(scope, {}) if part is None else r.get(scope, {}).get(part, {}) for scope in (uncaptioned, captioned)]
        mean = f"{np.mean([t['R@10'] for t in tens]):.3f}" if all("R@10" in t for t in tens) else ""
        return values + [mean]

    def prior(scope: str) -> str:
        return " / ".join(f"{h:g}" for h in r.get("beam_hubness_weights", {}).get(
            scope, [r.get(scope, {}).get("beam_hubness_weight", 0.0)]))

    def rerank(scope: str, part: str) -> str:
        # over seeds, each seed's pair: as chosen for the catalog scope (the same dev searches chose both)
        pairs = r.get("dev_weights" if part == "reranked_dev" else "fair_weights", {}).get("catalog_wide") or \
            [_weights_of(r[scope][part])]
        return " / ".join(f"{w:g}, {h:g}" for w, h in pairs)

    if "catalog_captioned" not in r:
        return []
    if "hubness_beta" in r.get("catalog_captioned", {}):  # the dense baseline's hubness correction
        return [["similarity - β × hubness", "dev", f"{r['catalog_captioned']['hubness_beta']:g}",
                 *cells("catalog", "catalog_captioned")],
                ["similarity - β × hubness", "dev, fair", f"{r['catalog_fair']['hubness_beta']:g}",
                 *cells("catalog_fair", "catalog_captioned_fair")]]
    searched = "beams" in r["catalog_captioned"]
    rows = [[f"beam {meta['beams']}" if searched else "similarity", "", "", *cells("catalog", "catalog_captioned")]]
    if "catalog_captioned_prior" in r:
        rows += [[f"beam {meta['beams']}, prior h", "dev", prior("catalog_captioned_prior"), *cells("catalog_prior", "catalog_captioned_prior")],
                 [f"beam {meta['beams']}, prior h", "dev, fair", prior("catalog_prior_fair"),
                  *cells("catalog_prior_fair", "catalog_captioned_prior_fair")]]
    for part, chosen_on in (("reranked_dev", "dev"), ("reranked_fair", "dev, fair")):
        if part in r.get("catalog_captioned_wide", {}):
            rows.append([f"re-ranked w, h (beam {meta['wide_beams']})", chosen_on,
                         rerank("catalog_captioned_wide", part),
                         *cells("catalog_wide", "catalog_captioned_wide", part)])
    return rows


def write_report(out: Path, results: dict, meta: dict) -> None:
    write_json(out / "results.json", {"meta": meta, "results": results})
    lines = [f"# Flickr8k generative retrieval ({meta['setting']} setting)", "",
             f"catalog {meta['catalog_images']} images, {meta['train_captions']} training captions, "
             f"{meta['queries']} test queries over {meta['test_images']} test images, {meta['dev_queries']} dev "
             f"queries over {meta['dev_images']} dev images; beams {meta['beams']}; machine: {meta['machine']}", "",
             f"Re-ranked: a beam of {meta['wide_beams']}, each hit's score (its log-probability) plus w × the "
             "two-tower's query-image similarity minus h × the image's hubness (its mean similarity to its "
             "5 nearest training captions), w and h the pair best on the dev queries (w of "
             f"{', '.join(f'{w:g}' for w in RERANK_WEIGHTS)}; h of {', '.join(f'{w:g}' for w in HUBNESS_WEIGHTS)}; "
             "one pair per seed), searching the dev images for the test scope and the whole catalog for the "
             "catalog scope. The dense baseline's hubness correction ranks by similarity - β × hubness, β "
             f"(of {', '.join(f'{b:g}' for b in DENSE_HUBNESS)}) chosen on the dev queries the same way.", "",
             "| approach | test R@1 | test R@5 | test R@10 | catalog R@1 | catalog R@5 | catalog R@10 | "
             "test R@1/5/10, re-ranked | catalog R@1/5/10, re-ranked | w, h (dev): test; catalog | "
             "s/query (test, catalog wide) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "test" not in r:  # measured with --spoken-only: in the describe/ask table alone
            continue
        wide = r.get("catalog_wide", {})
        reranked = [" / ".join(_cell(r, scope, k, "reranked_dev") for k in ("R@1", "R@5", "R@10"))
                    if "reranked_dev" in r.get(scope, {}) else "" for scope in ("test_wide", "catalog_wide")]
        seconds = f"{r['test']['seconds_per_query']:.4f}" + (f", {wide['seconds_per_query']:.3f}" if wide else "")
        cells = [_cell(r, scope, k) for scope in ("test", "catalog") for k in ("R@1", "R@5", "R@10")]
        weights = [_dev_weights(r, scope) for scope in ("test_wide", "catalog_wide")]
        weights = "; ".join(weights) if any(weights) else ""
        lines.append(f"| {_label(name, r)} | {' | '.join(cells + reranked)} | {weights} | {seconds} |")
    prior = {name: r for name, r in results.items() if all(scope in r for scope in PRIOR_SCOPES)}
    if prior:
        lines += ["", f"Searched with the hubness prior in the beam (beam {meta['beams']}): each id's score is its "
                  "log-probability minus h × its image's hubness, inside the search, h (of "
                  f"{', '.join(f'{h:g}' for h in BEAM_HUBNESS_WEIGHTS)}) the weight best on the dev queries, "
                  "searched over the dev images for the test scope and the whole catalog for the catalog scope. "
                  f"Re-ranked: a beam of {meta['wide_beams']} searched with the same prior, then re-ranked as "
                  "above, (w, h) chosen on the dev queries searched the same way.", "",
                  "| approach | test R@1 | test R@5 | test R@10 | catalog R@1 | catalog R@5 | catalog R@10 | "
                  "test R@1/5/10, re-ranked | catalog R@1/5/10, re-ranked | prior h (dev): test; catalog | "
                  "re-ranking w, h (dev): test; catalog |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in prior.items():
            cells = [_cell(r, scope, k) for scope in PRIOR_SCOPES for k in ("R@1", "R@5", "R@10")]
            cells += [" / ".join(_cell(r, scope, k, "reranked_dev") for k in ("R@1", "R@5", "R@10"))
                      if "reranked_dev" in r.get(scope, {}) else "" for scope in ("test_wide_prior", "catalog_wide_prior")]
            weights = "; ".join(" / ".join(f"{h:g}" for h in r.get("beam_hubness_weights", {}).get(
                scope, [r[scope]["beam_hubness_weight"]])) for scope in PRIOR_SCOPES)
            rerank_weights = "; ".join(_dev_weights(r, scope) for scope in ("test_wide_prior", "catalog_wide_prior"))
            lines.append(f"| {_label(name, r)} | {' | '.join(cells)} | {weights} | {rerank_weights.strip('; ')} |")
    spoken = {name: r for name, r in results.items() if "describe_captioned" in r}
    if spoken:
        lines += ["", "Describe and ask by id alone: content-word F1 of the description against the image's captions, "
                  "and yes/no accuracy on whether they mention a word (half do), beside what word frequency alone "
                  "scores on the same questions (the control, genret.evaluation). Captioned: images whose captions "
                  "were trained on; uncaptioned: the test images, whose captions never were.", "",
                  "| approach | captioned describe F1 | captioned yes/no | word prior | uncaptioned describe F1 "
                  "| uncaptioned yes/no | word prior |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in spoken.items():
            cells = [_cell(r, scope, metric) + _yes_no_details(r, scope, metric) for scope in SPOKEN_SCOPES
                     for metric in ("describe_word_f1", "yes_no_accuracy", "yes_no_word_prior")]
            lines.append(f"| {_label(name, r)} | {' | '.join(cells)} |")
        if any(_yes_no_details(r, scope, "yes_no_accuracy") for r in spoken.values() for scope in SPOKEN_SCOPES):
            lines += ["", "In brackets: the yes/no accuracy of a model that asks after its own description on the "
                      "questions that description answers (stated), the share of questions answered yes (yes; "
                      "the right share is 0.5, and a model near 0 or 1 does not tell images apart), the ROC AUC of "
                      "log P(Yes) - log P(No) (AUC: above 0.5 the model leans yes more where the answer is yes, "
                      "whichever way it answers), and the accuracy of \"yes iff its own description mentions the "
                      "word\" (by description) (genret.evaluation)."]
    if any("catalog_captioned" in r for r in results.values()):
        lines += ["", f"Queries for captioned images (`--captioned-queries`): one held-out caption of each of "
                  f"{meta.get('captioned_queries')} train images, whose other captions were trained on, searched over "
                  "the whole catalog beside the test queries (whose images have no trained captions). Each weight is "
                  "chosen twice: on the dev queries as above, which all seek uncaptioned images, and on the mean of "
                  f"those and {meta.get('dev_captioned_queries')} held-out captions of other train images (fair). "
                  "Mean: of the two R@10.", "",
                  "| approach | ranking | weight chosen on | weight | uncaptioned R@1 | R@5 | R@10 | captioned R@1 | R@5 | "
                  "R@10 | mean R@10 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in results.items():
            lines += [f"| {_label(name, r)} | {' | '.join(cells)} |" for cells in _captioned_rows(r, meta)]
    if any("seeds" in r for r in results.values()):
        lines += ["", "Rows over several seeds: mean ± standard deviation across the training seeds."]
    lines += ["", f"Reproduce: `{meta['command']}`"]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, r in results.items() if "test" in r]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 4))
    for i, k in enumerate(("R@1", "R@5", "R@10")):
        errors = [results[n].get("spread", {}).get("test", {}).get(k, 0.0) for n in names]
        ax.bar(np.arange(len(names)) + (i - 1) * 0.27, [results[n]["test"][k] for n in names], 0.27, label=k,
               yerr=errors if any(errors) else None, capsize=2)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("recall over test images")
    ax.set_title(f"Flickr8k, {meta['setting']} setting")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "recall.png", dpi=120)
