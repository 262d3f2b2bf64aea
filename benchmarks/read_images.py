"""Image encoding throughput and memory by photo size: how fast training (and `genret add`) turns a
catalog's files into features, and how much memory that takes.

    python benchmarks/read_images.py                                  # 64 photos each at 640x480, 2016x1512, 4032x3024
    python benchmarks/read_images.py --count 16 --sizes 4032x3024 --out /tmp/r

The photos are the demo catalog's, resized and saved as JPEG (quality 90) in a temporary folder.
Each size is measured twice, in a fresh process each time so the peak resident memory is its own:
`encode_paths` as training calls it (each JPEG decoded at the smallest scale that keeps 224 px,
cut to 224x224 as it is read, in a thread pool), and `whole`: every file decoded at full size
and a batch of 64 held at once, as encode_paths did before. Writes <out>/results.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    from PIL import Image

    from genret.demo_catalog import write_demo_catalog

    images, _ = write_demo_catalog(folder / "demo")
    sources = sorted(images.glob("*.jpg"))
    paths = []
    for i in range(count):
        path = folder / f"photo{i:04d}.jpg"
        Image.open(sources[i % len(sources)]).convert("RGB").resize(size, Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def measure(folder: Path, mode: str) -> dict:
    """In this process: encode every photo in `folder` once, after loading the network."""
    from PIL import Image

    from genret.encoders import ImageEncoder

    paths = sorted(folder.glob("photo*.jpg"))
    encoder = ImageEncoder()
    encoder.model  # noqa: B018  (loads it, outside the timing)
    started = time.perf_counter()
    if mode == "encode_paths":
        encoder.encode_paths(paths, progress=False)
    else:
        for start in range(0, len(paths), 64):
            batch = [Image.open(p) for p in paths[start : start + 64]]
            for image in batch:
                image.load()
            encoder.encode_images(batch)
    seconds = time.perf_counter() - started
    return {"mode": mode, "images": len(paths), "images_per_s": round(len(paths) / seconds, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def report(rows: list[dict]) -> str:
    lines = ["| photo size | mode | images | images/s | peak RSS (MiB) |", "|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['mode']} | {r['images']} | {r['images_per_s']} | {r['peak_rss_mib']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=64, help="photos per size")
    parser.add_argument("--sizes", nargs="+", default=["640x480", "2016x1512", "4032x3024"], help="WIDTHxHEIGHT")
    parser.add_argument("--modes", nargs="+", choices=["encode_paths", "whole"], default=["encode_paths", "whole"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "read_images")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # a child: the photo folder
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.modes[0])))
        return 0
    try:
        sizes = [tuple(int(side) for side in s.lower().split("x")) for s in args.sizes]
        if any(len(size) != 2 or min(size) < 1 for size in sizes) or args.count < 1:
            raise ValueError
    except ValueError:
        parser.error("--sizes are WIDTHxHEIGHT with positive sides, such as 4032x3024, and --count is positive")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for text, size in zip(args.sizes, sizes):
            folder = Path(tmp) / text
            write_photos(folder, args.count, size)
            for mode in args.modes:
                done = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--modes", mode],
                                      capture_output=True, text=True, check=True)
                rows.append({"size": text, **json.loads(done.stdout.strip().splitlines()[-1])})
                print(report(rows[-1:]).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"machine": platform.platform(), "processor": platform.processor(), "results": rows}, indent=2) + "\n")
    (args.out / "results.md").write_text(report(rows))
    print(report(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
