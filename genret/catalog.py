"""The user's image catalog: a folder of images plus a captions file (Flickr8k-style CSV or COCO JSON).

Everything the model memorizes comes from here, so loading is strict: any problem in the
captions file is reported as a CatalogError naming the file and the offending row, instead
of silently training on a catalog that differs from what the user meant.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import unicodedata
from collections.abc import Container, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np
import pillow_heif
from PIL import Image, ImageCms, ImageOps

pillow_heif.register_heif_opener()  # phones (iPhones by default) save photos as HEIC
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic",
                            ".heif"})


BLANK_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})  # separators, control and format characters


def is_blank(text: str) -> bool:
    """No character of the text would show: it is whitespace, control and format characters
    (zero-width spaces and joiners, byte-order marks) alone. Such a caption has nothing to learn,
    and such a query or question nothing to search or answer by (str.strip keeps them)."""
    return all(unicodedata.category(c) in BLANK_CATEGORIES for c in text)


class CatalogError(ValueError):
    """A catalog that cannot be loaded as given; the message says where (file, row)."""


@dataclass(frozen=True)
class CatalogImage:
    key: str
    path: Path
    captions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists / str paths from callers but keep the object hashable and immutable.
        # (Only where needed: a Path costs microseconds, and a stored catalog can hold a million.)
        if not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))
        if not isinstance(self.captions, tuple):
            object.__setattr__(self, "captions", tuple(self.captions))


@dataclass(frozen=True)
class Catalog:
    images: tuple[CatalogImage, ...]
    _index: dict[str, CatalogImage] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Sorted keys make identifier assignment and manifests independent of file order.
        images = tuple(sorted(self.images, key=lambda im: im.key))
        index: dict[str, CatalogImage] = {}
        for im in images:
            if im.key in index:
                raise CatalogError(f"duplicate catalog key {im.key!r}")
            index[im.key] = im
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[CatalogImage]:
        return iter(self.images)

    def __getitem__(self, key: str) -> CatalogImage:
        return self._index[key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._index

    def keys(self) -> list[str]:
        return [im.key for im in self.images]

    def captions(self) -> dict[str, list[str]]:
        return {im.key: list(im.captions) for im in self.images if im.captions}

    def _check_known(self, keys: Iterable[str]) -> set[str]:
        wanted = set(keys)
        unknown = sorted(k for k in wanted if k not in self)
        if unknown:
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise CatalogError(f"unknown catalog key(s): {', '.join(map(repr, unknown[:5]))}{more}")
        return wanted

    def subset(self, keys: Iterable[str]) -> Catalog:
        wanted = self._check_known(keys)
        return Catalog(tuple(im for im in self.images if im.key in wanted))

    def without_captions_for(self, keys: Iterable[str]) -> Catalog:
        # Held-out query protocol: the image is still memorized, but its captions are kept
        # out of training so they can serve as unseen queries.
        held = self._check_known(keys)
        return Catalog(tuple(replace(im, captions=()) if im.key in held else im for im in self.images))

    def to_records(self, root: str | Path | None = None) -> list[dict]:
        """With `root`, paths under it are written relative so a manifest survives moving the tree."""
        base = Path(root).resolve() if root is not None else None
        records = []
        for im in self.images:
            path = im.path
            if base is not None and path.is_relative_to(base):
                path = path.relative_to(base)
            records.append({"key": im.key, "path": str(path), "captions": list(im.captions)})
        return records

    @classmethod
    def from_records(cls, records: Iterable[dict], root: str | Path | None = None) -> Catalog:
        base = str(Path(root).resolve()) if root is not None else None
        images = []
        for i, rec in enumerate(records):
            try:
                key, path, captions = rec["key"], os.fspath(rec["path"]), rec.get("captions", [])
            except (KeyError, TypeError) as e:
                raise CatalogError(f"records[{i}]: expected an object with 'key' and 'path' ({e!r})") from None
            if not isinstance(key, str) or not key:
                raise CatalogError(f"records[{i}]: 'key' must be a non-empty string")
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise CatalogError(f"records[{i}]: 'captions' must be a list of strings")
            if not os.path.isabs(path):  # joined as strings: one Path per image, not three
                path = os.path.join(base, path) if base is not None else Path(path).resolve()
            images.append(CatalogImage(key, Path(path), tuple(captions)))
        return cls(tuple(images))


def load_catalog(
    images_dir: str | Path,
    captions_file: str | Path,
    *,
    fmt: str = "auto",
    include_uncaptioned: bool = True,
    verify_images: bool = True,
    duplicates: str = "error",
) -> Catalog:
    """`duplicates` decides what a repeated (image, caption) pair does: "error" (default, it is
    usually a copy-paste slip), "keep" (the published Flickr8k file has 10 such rows and its
    canonical 40455-caption count includes them) or "drop"."""
    if duplicates not in ("error", "keep", "drop"):
        raise CatalogError(f"{captions_file}: unknown duplicates={duplicates!r} (expected 'error', 'keep' or 'drop')")
    images_dir = Path(images_dir).resolve()
    captions_file = Path(captions_file)
    if not captions_file.is_file():
        raise CatalogError(f"{captions_file}: captions file not found")
    if not images_dir.is_dir():
        raise CatalogError(f"{images_dir}: images directory not found")
    if fmt == "auto":
        fmt = {".csv": "csv", ".json": "coco"}.get(captions_file.suffix.lower(), "")
        if not fmt:
            raise CatalogError(f"{captions_file}: cannot tell the format from the suffix; pass fmt='csv' or 'coco'")
    if fmt == "csv":
        entries = _read_csv(captions_file, duplicates)
    elif fmt == "coco":
        entries = _read_coco(captions_file, duplicates)
    else:
        raise CatalogError(f"{captions_file}: unknown fmt {fmt!r} (expected 'auto', 'csv' or 'coco')")

    images: list[CatalogImage] = []
    checks: list[tuple[Path, str]] = []  # (image, how an error names it)
    # entries: key -> (where the key was first named, captions)
    for key, (where, caps) in entries.items():
        if not caps and not include_uncaptioned:
            continue
        if Path(key).is_absolute() or ".." in Path(key).parts:  # the service would serve it as a catalog image
            where_it_is = (images_dir / key).resolve()  # an absolute key replaces images_dir
            fix = (f"write {where_it_is.relative_to(images_dir).as_posix()!r}" if where_it_is.is_relative_to(images_dir)
                   else f"this one is outside {images_dir}")
            raise CatalogError(f"{captions_file}: {where}: image {key!r}: images are named by their path inside "
                               f"the images folder, without '..'; {fix}")
        path = images_dir / key
        if not path.is_file():
            raise CatalogError(f"{captions_file}: {where}: image {key!r} not found in {images_dir}")
        checks.append((path, f"{captions_file}: {where}: image {key!r}"))
        images.append(CatalogImage(key, path, tuple(caps)))

    if include_uncaptioned:
        folder_images = _folder_images(images_dir, entries)
        images += folder_images
        checks += [(image.path, str(image.path)) for image in folder_images]
    if verify_images:
        _verify_all(checks)
    if not images:
        raise CatalogError(f"{captions_file}: catalog has no images (images directory {images_dir})")
    return Catalog(tuple(images))


def load_image_folder(images_dir: str | Path, *, verify_images: bool = True) -> Catalog:
    """Every image in a folder, without captions (images to add to a trained model, say)."""
    images_dir = Path(images_dir).resolve()
    if not images_dir.is_dir():
        raise CatalogError(f"{images_dir}: images directory not found")
    images = _folder_images(images_dir, {})
    if not images:
        raise CatalogError(f"{images_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if verify_images:
        _verify_all([(image.path, str(image.path)) for image in images])
    return Catalog(tuple(images))


def _folder_images(images_dir: Path, named: Container[str]) -> list[CatalogImage]:
    """The folder's images whose names are not in `named`, uncaptioned."""
    images = []
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and path.name not in named:
            try:  # a name the file system's encoding could not decode holds lone surrogates
                path.name.encode("utf-8")
            except UnicodeEncodeError:
                raise CatalogError(f"{images_dir}: image file name {path.name!r} is not UTF-8: rename it (the "
                                   "name becomes the image's key, in JSON, URLs and Redis)") from None
            images.append(CatalogImage(path.name, path, ()))
    return images


def read_image(path: str | os.PathLike, what: str | None = None, *,
               at_least: tuple[int, int] | None = None) -> Image.Image:
    """The image decoded in full, as_seen, or a CatalogError naming it (`what`, default its path).
    With `at_least` (width, height), a JPEG decodes at the smallest of its 1/2, 1/4, 1/8 scales
    that keeps both sides that big: it still reads every byte, in a fraction of the time and memory."""
    try:
        with Image.open(path) as im:
            if at_least:
                im.draft(None, at_least)
            im.load()
            return as_seen(im)
    except Exception as e:  # PIL raises a variety of types for corrupt files
        raise CatalogError(f"{what or path}: not a readable image ({type(e).__name__}: {e})") from None


def _verify_all(checks: list[tuple[Path, str]]) -> None:
    """_verify each (image, name), in a thread pool (PIL decodes outside the GIL): one thread checked
    12-megapixel photos at ~50/s, a third of what encoding them costs. Raises the first failure in
    catalog order, and leaves the checks not yet begun undone."""
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for _ in pool.map(lambda check: _verify(*check), checks):
            pass
    finally:
        pool.shutdown(cancel_futures=True)


def _verify(path: Path, what: str) -> None:
    # A full decode: Image.verify() reads only a JPEG's header, so a truncated file passed it and
    # failed later, mid-training.
    read_image(path, what, at_least=(1, 1))


def as_seen(image: Image.Image) -> Image.Image:
    """The sRGB picture a person is shown, which `image.convert("RGB")` alone is not: phones store
    photos sideways with an EXIF orientation that viewers apply; an embedded colour profile (a
    camera's Adobe RGB, a phone's Display P3, a print shop's CMYK) says what its numbers mean;
    transparency would show what lies under it (usually black) instead of the page behind; 16-bit
    grey would clip to white."""
    profile = image.info.get("icc_profile")
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # 16-bit PNG grey ("I;16"), or 32-bit integer holding it
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).clip(0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if profile:
        image = in_srgb(image, profile)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return image.convert("RGB")


def in_srgb(image: Image.Image, profile: bytes) -> Image.Image:
    """The image's colours, described by the ICC `profile` embedded in its file, in sRGB (what
    colour-managed viewers and browsers do). A profile that does not parse, or that is for another
    colour space than the image's mode, is ignored, as browsers ignore it: the numbers are read as sRGB."""
    try:
        return ImageCms.applyTransform(image, _to_srgb(profile, image.mode))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return image


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# (profile's colour space, image mode) -> the mode of the image in sRGB
_COLOUR_MODES = {("RGB", "RGB"): "RGB", ("RGB", "RGBA"): "RGBA", ("GRAY", "L"): "RGB", ("CMYK", "CMYK"): "RGB"}


@functools.lru_cache(maxsize=64)  # a camera or phone embeds the same profile in every photo; a build takes ~3 ms
def _to_srgb(profile: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    space = source.profile.xcolor_space.strip()
    if (space, mode) not in _COLOUR_MODES:
        raise ValueError(f"a {space} profile on a {mode} image")
    return ImageCms.buildTransform(source, _SRGB, mode, _COLOUR_MODES[space, mode])


def _repeat_is_dropped(seen: dict[tuple[str, str], str], pair: tuple[str, str], where: str, path: Path,
                       duplicates: str) -> bool:
    """Remembers where each (image, caption) pair first appears. A repeat raises under
    duplicates='error'; otherwise the answer is whether to drop it ('drop') or keep it ('keep')."""
    if pair not in seen:
        seen[pair] = where
        return False
    if duplicates == "error":
        raise CatalogError(f"{path}: {where} repeats {seen[pair]} ({pair[0]!r}, {pair[1]!r});"
                           " pass duplicates='keep' or 'drop' if that is intended")
    return duplicates == "drop"


def read_utf8(path: Path) -> str:
    """A text file the user wrote. utf-8-sig: spreadsheets often prepend a BOM, which would
    otherwise corrupt a CSV's header. Another encoding is named with its line, not as a bare codec error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CatalogError(f"{path}: line {line}: not UTF-8 text (byte {data[e.start]:#04x});"
                           " save the file as UTF-8") from None


def image_key(name: str) -> str:
    """A captions file's image name as a key: "./a.jpg" and "sub//b.jpg" name the files that
    "a.jpg" and "sub/b.jpg" do, and the folder scan finds a.jpg under "a.jpg", so the same image
    would otherwise enter the catalog twice, under two keys."""
    name = name.strip()
    return str(PurePosixPath(name)) if name else name


def csv_delimiter(text: str) -> str:
    """The delimiter whose split of the first line names both 'image' and 'caption': a comma, or
    the semicolon that spreadsheets in many locales write, or a tab (TSV). A comma otherwise."""
    first = text.split("\n", 1)[0]
    for delimiter in (",", ";", "\t"):
        if {"image", "caption"} <= {cell.strip().strip('"').strip().lower() for cell in first.split(delimiter)}:
            return delimiter
    return ","


def _read_csv(path: Path, duplicates: str) -> dict[str, tuple[str, list[str]]]:
    entries: dict[str, tuple[str, list[str]]] = {}
    seen: dict[tuple[str, str], str] = {}
    text = read_utf8(path)
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f, delimiter=csv_delimiter(text))
        try:
            header = next(reader)
        except StopIteration:
            raise CatalogError(f"{path}: row 1: empty file, expected header 'image,caption'") from None
        except csv.Error as e:
            raise CatalogError(f"{path}: row 1: {e}") from None
        cols = [c.strip().lower() for c in header]
        if "image" not in cols or "caption" not in cols:
            raise CatalogError(f"{path}: row 1: header must have 'image' and 'caption' columns (separated by commas, "
                               f"semicolons or tabs), got {header!r}")
        ii, ci = cols.index("image"), cols.index("caption")
        while True:
            line = reader.line_num + 1  # physical line where this row starts (captions may span lines)
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise CatalogError(f"{path}: row {line}: {e}") from None
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) <= max(ii, ci):
                raise CatalogError(f"{path}: row {line}: expected {len(header)} columns, got {len(row)}")
            key, caption = image_key(row[ii]), row[ci].strip()
            if not key:
                raise CatalogError(f"{path}: row {line}: empty image name")
            if is_blank(caption):
                raise CatalogError(f"{path}: row {line}: empty caption for image {key!r}")
            if _repeat_is_dropped(seen, (key, caption), f"row {line}", path, duplicates):
                continue
            entries.setdefault(key, (f"row {line}", []))[1].append(caption)
    return entries


def _read_coco(path: Path, duplicates: str) -> dict[str, tuple[str, list[str]]]:
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise CatalogError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise CatalogError(f"{path}: expected a COCO captions object with 'images' and 'annotations' lists")

    seen: dict[tuple[str, str], str] = {}
    by_id: dict[object, str] = {}
    id_at: dict[object, int] = {}
    entries: dict[str, tuple[str, list[str]]] = {}
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise CatalogError(f"{path}: {where}: expected an object with 'id' and 'file_name'")
        image_id, name = img["id"], image_key(img["file_name"])
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            raise CatalogError(f"{path}: {where}: 'id' must be an integer or string")
        if not name:
            raise CatalogError(f"{path}: {where}: empty file_name")
        if image_id in id_at:
            raise CatalogError(f"{path}: {where}: duplicate image id {image_id!r} (first at images[{id_at[image_id]}])")
        if name in entries:
            raise CatalogError(f"{path}: {where}: duplicate file_name {name!r} (first at {entries[name][0]})")
        id_at[image_id] = i
        by_id[image_id] = name
        entries[name] = (where, [])

    for j, ann in enumerate(data["annotations"]):
        where = f"annotations[{j}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise CatalogError(f"{path}: {where}: expected an object with 'image_id' and 'caption'")
        image_id = ann["image_id"]
        if isinstance(image_id, (list, dict)) or image_id not in by_id:
            raise CatalogError(f"{path}: {where}: unknown image_id {image_id!r}")
        caption = ann.get("caption")
        if not isinstance(caption, str) or is_blank(caption):
            raise CatalogError(f"{path}: {where}: empty caption for image id {image_id!r}")
        name, caption = by_id[image_id], caption.strip()
        if _repeat_is_dropped(seen, (name, caption), where, path, duplicates):
            continue
        entries[name][1].append(caption)
    return entries


def read_split(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: split file not found")
    keys: list[str] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(read_utf8(path).splitlines(), start=1):
        key = image_key(line)
        if not key:
            continue
        if key in seen:
            raise CatalogError(f"{path}: line {n} repeats line {seen[key]} ({key!r})")
        seen[key] = n
        keys.append(key)
    return keys
