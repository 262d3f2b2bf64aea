"""How long `genret remove` takes as the catalog grows: 1,000 images out of 10K to 1M atomic ids.

    python benchmarks/remove_images.py                                   # 10K and 100K ids
    python benchmarks/remove_images.py --sizes 300 --remove 10 --out /tmp/r   # quick

The models are benchmarks/vllm_search.py's: a tiny trained model grown to N atomic ids (trained
here once in about 2 minutes on a CPU, or given with --base). Removal rewrites the catalog, the id
map and the per-image tables and hard-links the rest (the weights), so its time should grow with
the catalog, not with the LM. Each size's model is grown afresh, then the same number of random
images is removed from it; <out>/results.json and <out>/results.md hold the times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

from vllm_search import REPO, git_commit, grow, train_base  # also puts the repo on sys.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--remove", type=int, default=1000, help="images removed at each size (default 1000)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "remove-images")
    parser.add_argument("--base", type=Path, help="a trained model with atomic ids to grow (default: train one)")
    args = parser.parse_args(argv)
    if min(args.sizes) < 2 or not 1 <= args.remove < min(args.sizes):
        parser.error("each size must exceed --remove, which must be at least 1")

    from genret.model_store import StoredModel, folder_bytes
    from genret.removing import remove_images

    base = args.base or train_base(args.out / "base")
    rows = []
    for n in sorted(set(args.sizes)):
        model = args.out / "models" / str(n)
        shutil.rmtree(model, ignore_errors=True)  # removal changes it: every measurement starts from N ids
        grow(base, n, model)
        weights = model / "lm" / "model.safetensors"
        inode, model_bytes = weights.stat().st_ino, folder_bytes(model)
        keys = random.Random(n).sample(StoredModel.open(model).keys, args.remove)
        started = time.perf_counter()
        removed = remove_images(model, keys)
        seconds = time.perf_counter() - started
        assert len(removed.keys) == args.remove and len(StoredModel.open(model).keys) == n - args.remove
        rows.append({"ids": n, "removed": args.remove, "seconds": round(seconds, 3),
                     "model_mb": round(model_bytes / 2**20), "weights_linked": weights.stat().st_ino == inode})
        print(f"{n:,} ids: removed {args.remove:,} in {seconds:.2f} s", flush=True)
        shutil.rmtree(model)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
            "commit": git_commit(), "command": " ".join(["python benchmarks/remove_images.py",
                                                          *(sys.argv[1:] if argv is None else argv)])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    table = ["| ids | removed | seconds | model folder (MB) | weights linked, not copied |", "|---|---|---|---|---|"]
    table += [f"| {r['ids']:,} | {r['removed']:,} | {r['seconds']:.2f} | {r['model_mb']:,} | {r['weights_linked']} |"
              for r in rows]
    report = "\n".join([f"# genret remove ({meta['machine']}, commit {meta['commit']})", "", *table,
                        "", f"`{meta['command']}`", ""])
    (args.out / "results.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
