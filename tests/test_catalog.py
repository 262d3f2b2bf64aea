import csv
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from genret.catalog import Catalog, CatalogError, CatalogImage, load_catalog, load_image_folder, read_split
from genret.demo_catalog import DEMO_CAPTIONS, demo_queries, write_demo_catalog


def make_image(path: Path, color=(200, 30, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format=fmt)
    return path


def write_csv(path: Path, rows, header=("image", "caption")):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header is not None:
            w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    make_image(images / "a.jpg")
    make_image(images / "b.png", (0, 255, 0))
    make_image(images / "c.JPEG", (0, 0, 255), fmt="JPEG")
    (images / "notes.txt").write_text("not an image, ignored by suffix")
    make_image(images / "sub" / "deep.jpg")  # not top level: ignored
    return images


CSV_ROWS = [
    ("a.jpg", "A red square ."),
    ("a.jpg", "  Something red  "),
    ("b.png", "A green square"),
]


# ---------------------------------------------------------------- CSV


def test_csv_happy_path(folder, tmp_path):
    caps = write_csv(tmp_path / "captions.csv", CSV_ROWS)
    cat = load_catalog(folder, caps)
    assert cat.keys() == ["a.jpg", "b.png", "c.JPEG"]
    assert len(cat) == 3
    assert cat["a.jpg"].captions == ("A red square .", "Something red")
    assert cat["a.jpg"].path == (folder / "a.jpg").resolve() and cat["a.jpg"].path.is_absolute()
    assert cat["c.JPEG"].captions == ()
    assert cat.captions() == {"a.jpg": ["A red square .", "Something red"], "b.png": ["A green square"]}
    assert "b.png" in cat and "zzz.jpg" not in cat and 3 not in cat
    assert [im.key for im in cat] == cat.keys()
    with pytest.raises(KeyError):
        cat["zzz.jpg"]


def test_csv_exclude_uncaptioned(folder, tmp_path):
    caps = write_csv(tmp_path / "captions.csv", CSV_ROWS)
    cat = load_catalog(folder, caps, include_uncaptioned=False)
    assert cat.keys() == ["a.jpg", "b.png"]


def test_csv_extra_columns_bom_and_explicit_fmt(folder, tmp_path):
    p = tmp_path / "caps.txt"
    p.write_text("\ufeffid,caption,image\n1,A red square,a.jpg\n\n2,\"multi\nline\",b.png\n", encoding="utf-8")
    cat = load_catalog(folder, p, fmt="csv", include_uncaptioned=False)
    assert cat.captions() == {"a.jpg": ["A red square"], "b.png": ["multi\nline"]}
    with pytest.raises(CatalogError, match="caps.txt.*format"):
        load_catalog(folder, p)


@pytest.mark.parametrize("delimiter", [";", "\t"], ids=["semicolon (a spreadsheet's, in many locales)", "tab"])
def test_csv_separated_by_semicolons_or_tabs(folder, tmp_path, delimiter):
    p = tmp_path / "captions.csv"
    with p.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(
            [("image", "caption"), ("a.jpg", "A red square, flat; and small"), ("b.png", 'A "green" one')])
    cat = load_catalog(folder, p, include_uncaptioned=False)
    assert cat.captions() == {"a.jpg": ["A red square, flat; and small"], "b.png": ['A "green" one']}
    p.write_text("image|caption\na.jpg|A red square\n")  # another separator: named, with what it found
    with pytest.raises(CatalogError, match=r"row 1: header must have 'image' and 'caption' columns "
                                           r"\(separated by commas, semicolons or tabs\), got \['image\|caption'\]"):
        load_catalog(folder, p)
    from genret.cli import read_queries  # evaluate's queries file reads the same way

    p.write_text("image;caption\na.jpg;A red square, flat\n")
    assert read_queries(p) == [("A red square, flat", "a.jpg")]


def test_loading_writes_nothing(folder, tmp_path):
    caps = write_csv(tmp_path / "captions.csv", CSV_ROWS)
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    load_catalog(folder, caps)
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_missing_captions_file(folder, tmp_path):
    with pytest.raises(CatalogError, match="nope.csv"):
        load_catalog(folder, tmp_path / "nope.csv")


def test_missing_images_dir(tmp_path):
    caps = write_csv(tmp_path / "captions.csv", CSV_ROWS)
    with pytest.raises(CatalogError, match="no_such_dir"):
        load_catalog(tmp_path / "no_such_dir", caps)


def test_csv_bad_header(folder, tmp_path):
    caps = write_csv(tmp_path / "captions.csv", CSV_ROWS, header=("file", "text"))
    with pytest.raises(CatalogError, match=r"captions\.csv: row 1: .*'image' and 'caption'"):
        load_catalog(folder, caps)


def test_csv_empty_file(folder, tmp_path):
    p = tmp_path / "captions.csv"
    p.write_text("")
    with pytest.raises(CatalogError, match=r"captions\.csv: row 1"):
        load_catalog(folder, p)


def test_csv_empty_caption(folder, tmp_path):
    caps = write_csv(tmp_path / "captions.csv", CSV_ROWS + [("b.png", "   ")])
    with pytest.raises(CatalogError, match=r"captions\.csv: row 5: empty caption"):
        load_catalog(folder, caps)


def test_a_caption_of_zero_width_characters_is_empty(folder, tmp_path):
    caps = write_csv(tmp_path / "captions.csv", CSV_ROWS + [("b.png", "\u200b\ufeff")])
    with pytest.raises(CatalogError, match=r"captions\.csv: row 5: empty caption"):
        load_catalog(folder, caps)


def test_csv_missing_image(folder, tmp_path):
    caps = write_csv(tmp_path / "captions.csv", CSV_ROWS + [("gone.jpg", "x"), ("gone.jpg", "y")])
    with pytest.raises(CatalogError, match=r"captions\.csv: row 5: image 'gone.jpg' not found"):
        load_catalog(folder, caps)


@pytest.mark.parametrize("key", ["../outside.jpg", "sub/../../outside.jpg", "{absolute}"])
def test_an_image_outside_the_images_directory_is_refused(folder, tmp_path, key):
    """Named by a path that leaves the folder, an image would be trained on and served from
    wherever it is: a slip in the captions file, named as one."""
    key = key.format(absolute=make_image(tmp_path / "outside.jpg"))
    caps = write_csv(tmp_path / "captions.csv", CSV_ROWS + [(key, "a red square")])
    with pytest.raises(CatalogError, match=rf"captions\.csv: row 5: image '{re.escape(key)}': images are named by their path "
                                           rf"inside the images folder, without '\.\.'; this one is outside"):
        load_catalog(folder, caps)
    assert load_catalog(folder, write_csv(tmp_path / "sub.csv", [("sub/deep.jpg", "a red square")]))["sub/deep.jpg"]
    # a tool that wrote absolute paths: told the name to write instead
    caps = write_csv(tmp_path / "absolute.csv", [(str(folder / "sub" / "deep.jpg"), "a red square")])
    with pytest.raises(CatalogError, match=r"their path inside the images folder, without '\.\.'; write 'sub/deep\.jpg'"):
        load_catalog(folder, caps)


def test_csv_unreadable_image(folder, tmp_path):
    (folder / "bad.jpg").write_bytes(b"this is not a jpeg")
    caps = write_csv(tmp_path / "captions.csv", CSV_ROWS + [("bad.jpg", "x")])
    with pytest.raises(CatalogError, match=r"captions\.csv: row 5: image 'bad.jpg': not a readable image"):
        load_catalog(folder, caps)
    # Without verification the bad file is only named, never opened.
    assert "bad.jpg" in load_catalog(folder, caps, verify_images=False)


@pytest.mark.parametrize("name", ["cut.jpg", "cut.png"])
def test_truncated_image_is_caught_when_loading(folder, tmp_path, name):
    # Image.verify() reads only a JPEG's header: a cut-off file used to pass the catalog and
    # fail mid-training with a traceback. Both formats are decoded in full now.
    import numpy as np

    whole = tmp_path / name
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole)
    (folder / name).write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    caps = write_csv(tmp_path / "captions.csv", CSV_ROWS + [(name, "x")])
    with pytest.raises(CatalogError, match=rf"row 5: image '{name}': not a readable image .*truncated"):
        load_catalog(folder, caps)


def test_image_encoder_names_an_image_spoiled_after_loading(folder):
    from genret.encoders import ImageEncoder

    catalog = load_catalog(folder, write_csv(folder.parent / "captions.csv", CSV_ROWS))
    (folder / "a.jpg").write_bytes(b"overwritten since")
    with pytest.raises(CatalogError, match=r"a\.jpg: not a readable image"):
        ImageEncoder().encode_paths([im.path for im in catalog], progress=False)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_captions_not_utf8(folder, tmp_path, suffix):
    caps = tmp_path / f"captions{suffix}"
    body = "image,caption\na.jpg,A red square\nb.png,caf\xe9 au lait\n" if suffix == ".csv" else \
        '{"images": [],\n "annotations": [],\n "info": "caf\xe9"}'
    caps.write_bytes(body.encode("latin-1"))
    with pytest.raises(CatalogError, match=rf"captions\{suffix}: line 3: not UTF-8 text \(byte 0xe9\)"):
        load_catalog(folder, caps)


def test_unreadable_uncaptioned_image(folder, tmp_path):
    (folder / "bad.png").write_bytes(b"\x89PNG garbage")
    caps = write_csv(tmp_path / "captions.csv", CSV_ROWS)
    with pytest.raises(CatalogError, match=r"bad\.png: not a readable image"):
        load_catalog(folder, caps)
    assert "bad.png" not in load_catalog(folder, caps, include_uncaptioned=False)


def test_an_image_file_name_that_is_not_utf8_is_named(folder, tmp_path):
    make_image(folder / b"r\xffd.png".decode("utf-8", "surrogateescape"))
    caps = write_csv(tmp_path / "captions.csv", CSV_ROWS)
    for load in (lambda: load_catalog(folder, caps), lambda: load_image_folder(folder)):
        with pytest.raises(CatalogError, match=r"image file name 'r\\udcffd\.png' is not UTF-8: rename it"):
            load()


def _upright() -> Image.Image:
    """A picture whose orientation shows: red left, blue right, a white bar along the top."""
    im = Image.new("RGB", (96, 64), (200, 30, 30))
    im.paste((30, 30, 200), (48, 0, 96, 64))
    im.paste((255, 255, 255), (0, 0, 96, 12))
    return im


def test_images_read_as_a_person_sees_them(tmp_path):
    import numpy as np

    from genret.catalog import read_image

    upright = np.asarray(_upright(), dtype=np.int16)
    # A phone stores the sensor's pixels and says in EXIF how to turn them (6: 90 degrees clockwise).
    exif = Image.Exif()
    exif[0x0112] = 6
    _upright().transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    assert np.abs(np.asarray(read_image(tmp_path / "phone.jpg"), dtype=np.int16) - upright).mean() < 3

    # Transparency shows the white page behind it, not the black under it; a palette's too.
    logo = np.zeros((64, 64, 4), np.uint8)
    logo[16:48, 16:48] = (200, 30, 30, 255)
    Image.fromarray(logo, "RGBA").save(tmp_path / "logo.png")
    Image.fromarray(logo, "RGBA").convert("P").save(tmp_path / "logo.gif.png", transparency=0)
    for name in ("logo.png", "logo.gif.png"):
        seen = np.asarray(read_image(tmp_path / name))
        assert seen.shape == (64, 64, 3) and tuple(seen[0, 0]) == (255, 255, 255), name
        assert tuple(seen[32, 32]) == (200, 30, 30), name

    # 16-bit grey keeps its shades instead of clipping to white.
    Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode == "I;16"
    seen = np.asarray(read_image(tmp_path / "scan.png"))
    assert seen.shape == (64, 64, 3) and seen.min() == 0 and seen.max() == 255 and 120 < seen.mean() < 135


def _skimage_profile(name: str) -> bytes:
    """A real ICC profile, embedded in one of the photos scikit-image ships."""
    import skimage

    with Image.open(Path(skimage.__file__).parent / "data" / name) as im:
        return im.info["icc_profile"]


def test_colours_described_by_an_embedded_profile_are_read_in_srgb(tmp_path):
    import numpy as np

    from genret.catalog import read_image

    # Adobe RGB (1998), as cameras save it: the same numbers mean more saturated colours than in sRGB.
    adobe = _skimage_profile("rocket.jpg")
    patches = np.array([(128, 128, 128), (200, 60, 40), (60, 170, 80), (40, 70, 190), (230, 210, 90)], np.uint8)
    pixels = np.repeat(np.repeat(patches[:, None, None], 8, 1), 8, 2).reshape(-1, 8, 3)
    Image.fromarray(pixels).save(tmp_path / "camera.png", icc_profile=adobe)
    # What the numbers mean, from the Adobe RGB and sRGB specifications (D65 both), not from littlecms.
    def to_xyz(primaries):
        xyz = np.array([[x / y, 1, (1 - x - y) / y] for x, y in primaries]).T
        white = np.array([0.95047, 1.0, 1.08883])
        return xyz * np.linalg.solve(xyz, white)
    adobe_to_srgb = np.linalg.solve(to_xyz([(0.64, 0.33), (0.30, 0.60), (0.15, 0.06)]),
                                    to_xyz([(0.64, 0.33), (0.21, 0.71), (0.15, 0.06)]))
    linear = ((patches / 255.0) ** (563 / 256) @ adobe_to_srgb.T).clip(0, 1)  # the green is beyond sRGB's
    expected = 255 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    seen = np.asarray(read_image(tmp_path / "camera.png"), dtype=np.float64)[::8, 0]
    assert np.abs(seen - expected).max() <= 2, (seen, expected)
    assert np.abs(seen - patches).max() > 20  # read as sRGB, the green patch would be far off

    # A JPEG keeps its profile when decoded at a smaller scale; the encoder's PIL images get it too.
    Image.fromarray(pixels).resize((64, 320), Image.NEAREST).save(tmp_path / "camera.jpg", quality=95, icc_profile=adobe)
    small = np.asarray(read_image(tmp_path / "camera.jpg", at_least=(8, 8)), dtype=np.float64)
    assert small.shape == (40, 8, 3) and np.abs(small[4::8, 4] - expected).max() <= 4
    assert np.abs(np.asarray(read_image(tmp_path / "camera.jpg"), dtype=np.int16)
                  - np.asarray(as_seen_of(tmp_path / "camera.jpg"), dtype=np.int16)).max() == 0

    # An sRGB profile changes nothing; a profile that does not parse, or is for another colour
    # space than the image's, is ignored, as browsers ignore it.
    for name, profile in [("srgb.png", _skimage_profile("astronaut.png")), ("broken.png", b"not a profile"),
                          ("grey-profile.png", _skimage_profile("page.png"))]:
        Image.fromarray(pixels).save(tmp_path / name, icc_profile=profile)
        assert np.array_equal(np.asarray(read_image(tmp_path / name)), pixels), name

    # A grey scan tagged for print with 20% dot gain: its 50% dot prints as 70% ink, which reflects
    # 30% of the light, sRGB 149 (read as sRGB, 128 would reflect 22%).
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "scan.png", icc_profile=_skimage_profile("page.png"))
    r, g, b = np.asarray(read_image(tmp_path / "scan.png"), dtype=np.int16)[0, 0]
    assert r == g == b and abs(r - 255 * (1.055 * 0.3 ** (1 / 2.4) - 0.055)) <= 2


def as_seen_of(path: Path) -> Image.Image:
    from genret.catalog import as_seen

    with Image.open(path) as im:
        im.load()
        return as_seen(im)


def test_the_formats_phones_scanners_and_the_web_save_are_catalog_images(tmp_path):
    import numpy as np

    from genret.catalog import read_image

    upright = _upright()
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("photo.heic", "photo.HEIF", "photo.avif", "photo.tif", "photo.gif", "photo.webp"):
        upright.save(folder / name, quality=95)  # the lossy formats' quality; the others ignore it
    grey16 = np.linspace(0, 65535, 64 * 96).reshape(64, 96).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "scan.tiff")
    catalog = load_image_folder(folder)
    assert catalog.keys() == sorted(p.name for p in folder.iterdir())
    for image in catalog:
        seen = np.asarray(read_image(image.path), dtype=np.int16)
        if image.key == "scan.tiff":
            assert 120 < seen.mean() < 135 and seen.max() == 255
        else:
            assert np.abs(seen - np.asarray(upright, dtype=np.int16)).mean() < 6, image.key


def test_a_big_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_size_asked_for(tmp_path):
    from genret.catalog import read_image

    _upright().resize((1600, 1200)).save(tmp_path / "big.jpg")
    assert read_image(tmp_path / "big.jpg").size == (1600, 1200)
    assert read_image(tmp_path / "big.jpg", at_least=(224, 224)).size == (400, 300)  # 1/4: 1/8 is 200x150
    assert read_image(tmp_path / "big.jpg", at_least=(1, 1)).size == (200, 150)


def test_of_several_unreadable_images_the_first_in_catalog_order_is_named(tmp_path):
    folder = tmp_path / "images"
    for i in range(40):
        make_image(folder / f"im{i:02d}.png")
    for bad in ("im07.png", "im31.png"):  # checked in parallel: the later may fail first
        (folder / bad).write_bytes(b"not a png")
    with pytest.raises(CatalogError, match=r"im07\.png: not a readable image"):
        load_image_folder(folder)
    # the captions file's images come first, in its order; then the folder's uncaptioned ones
    captions = write_csv(tmp_path / "c.csv", [("im00.png", "x"), ("im31.png", "y")])
    with pytest.raises(CatalogError, match=r"c\.csv: row 3: image 'im31\.png': not a readable image"):
        load_catalog(folder, captions)


def test_each_image_verified_once(folder, tmp_path, monkeypatch):
    import genret.catalog as mod

    calls = []
    real = mod._verify
    monkeypatch.setattr(mod, "_verify", lambda path, what: (calls.append(path), real(path, what)))
    caps = write_csv(tmp_path / "captions.csv", [("a.jpg", f"caption {i}") for i in range(10)])
    load_catalog(folder, caps)
    assert sorted(p.name for p in calls) == ["a.jpg", "b.png", "c.JPEG"]


def test_csv_duplicate_row(folder, tmp_path):
    rows = [("a.jpg", "one"), ("b.png", "two"), ("a.jpg", "three"), ("a.jpg", "one ")]
    caps = write_csv(tmp_path / "captions.csv", rows)
    with pytest.raises(CatalogError, match=r"captions\.csv: row 5 repeats row 2"):
        load_catalog(folder, caps)


def test_csv_duplicates_keep_or_drop(folder, tmp_path):
    rows = [("a.jpg", "one"), ("a.jpg", "one"), ("a.jpg", "two")]
    caps = write_csv(tmp_path / "captions.csv", rows)
    assert load_catalog(folder, caps, duplicates="keep")["a.jpg"].captions == ("one", "one", "two")
    assert load_catalog(folder, caps, duplicates="drop")["a.jpg"].captions == ("one", "two")
    with pytest.raises(CatalogError, match="unknown duplicates"):
        load_catalog(folder, caps, duplicates="maybe")


def test_csv_short_row(folder, tmp_path):
    p = tmp_path / "captions.csv"
    p.write_text("image,caption\na.jpg,fine\nb.png\n")
    with pytest.raises(CatalogError, match=r"captions\.csv: row 3: expected 2 columns"):
        load_catalog(folder, p)


def test_no_images_at_all(tmp_path):
    images = tmp_path / "empty"
    images.mkdir()
    caps = write_csv(tmp_path / "captions.csv", [])
    with pytest.raises(CatalogError, match=r"captions\.csv: catalog has no images"):
        load_catalog(images, caps)


def test_only_uncaptioned_excluded_is_empty(folder, tmp_path):
    caps = write_csv(tmp_path / "captions.csv", [])
    assert len(load_catalog(folder, caps)) == 3
    with pytest.raises(CatalogError, match="no images"):
        load_catalog(folder, caps, include_uncaptioned=False)


# ---------------------------------------------------------------- COCO


def coco(images, annotations):
    return {"images": images, "annotations": annotations}


GOOD_COCO = coco(
    [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.png"}, {"id": 7, "file_name": "c.JPEG"}],
    [
        {"id": 10, "image_id": 1, "caption": "A red square. "},
        {"id": 11, "image_id": 2, "caption": "A green square"},
        {"id": 12, "image_id": 1, "caption": "Red"},
    ],
)


def write_json(path: Path, data):
    path.write_text(json.dumps(data))
    return path


def test_coco_happy_path(folder, tmp_path):
    p = write_json(tmp_path / "captions_train.json", GOOD_COCO)
    cat = load_catalog(folder, p)
    assert cat.keys() == ["a.jpg", "b.png", "c.JPEG"]
    assert cat["a.jpg"].captions == ("A red square.", "Red")
    assert cat["c.JPEG"].captions == ()
    assert load_catalog(folder, p, include_uncaptioned=False).keys() == ["a.jpg", "b.png"]
    other = tmp_path / "coco.data"
    other.write_text(p.read_text())
    assert load_catalog(folder, other, fmt="coco").keys() == cat.keys()


def test_an_image_named_with_a_dot_path_is_the_folders_image_not_a_second_one(folder, tmp_path):
    """"./a.jpg" in a captions file made a.jpg enter the catalog twice: captioned under
    "./a.jpg", and uncaptioned under "a.jpg" from the folder scan."""
    csv_file = write_csv(tmp_path / "captions.csv", [("./a.jpg", "A red square"), ("a.jpg", "Red"),
                                                     ("sub//deep.jpg", "Deep")])
    coco_file = write_json(tmp_path / "captions.json", coco(
        [{"id": 1, "file_name": "./a.jpg"}], [{"id": 10, "image_id": 1, "caption": "A red square"}]))
    for captions, expected in ((csv_file, ["A red square", "Red"]), (coco_file, ["A red square"])):
        cat = load_catalog(folder, captions)
        assert "./a.jpg" not in cat.keys() and list(cat["a.jpg"].captions) == expected
        assert len(cat.keys()) == len({im.path.resolve() for im in cat})
    assert load_catalog(folder, csv_file)["sub/deep.jpg"].captions == ("Deep",)
    (tmp_path / "split.txt").write_text("./a.jpg\nb.png\n")
    assert read_split(tmp_path / "split.txt") == ["a.jpg", "b.png"]


def test_coco_uncaptioned_folder_images(folder, tmp_path):
    p = write_json(tmp_path / "c.json", coco([{"id": 1, "file_name": "a.jpg"}], [{"image_id": 1, "caption": "red"}]))
    assert load_catalog(folder, p).keys() == ["a.jpg", "b.png", "c.JPEG"]
    assert load_catalog(folder, p, include_uncaptioned=False).keys() == ["a.jpg"]


def test_coco_malformed_json(folder, tmp_path):
    p = tmp_path / "caps.json"
    p.write_text('{"images": [\n{"id": 1,}]}')
    with pytest.raises(CatalogError, match=r"caps\.json: malformed JSON at line 2"):
        load_catalog(folder, p)


def test_coco_wrong_shape(folder, tmp_path):
    p = write_json(tmp_path / "caps.json", [1, 2])
    with pytest.raises(CatalogError, match=r"caps\.json: expected a COCO"):
        load_catalog(folder, p)


def test_coco_duplicate_image_id(folder, tmp_path):
    data = coco([{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.png"}, {"id": 1, "file_name": "c.JPEG"}], [])
    p = write_json(tmp_path / "caps.json", data)
    with pytest.raises(CatalogError, match=r"caps\.json: images\[2\]: duplicate image id 1 \(first at images\[0\]\)"):
        load_catalog(folder, p)


def test_coco_duplicate_file_name(folder, tmp_path):
    data = coco([{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "a.jpg"}], [])
    p = write_json(tmp_path / "caps.json", data)
    with pytest.raises(CatalogError, match=r"caps\.json: images\[1\]: duplicate file_name 'a.jpg'"):
        load_catalog(folder, p)


def test_coco_unknown_image_id(folder, tmp_path):
    data = dict(GOOD_COCO, annotations=GOOD_COCO["annotations"] + [{"image_id": 99, "caption": "x"}])
    p = write_json(tmp_path / "caps.json", data)
    with pytest.raises(CatalogError, match=r"caps\.json: annotations\[3\]: unknown image_id 99"):
        load_catalog(folder, p)


def test_coco_duplicate_caption(folder, tmp_path):
    data = dict(GOOD_COCO, annotations=GOOD_COCO["annotations"] + [{"image_id": 1, "caption": " Red"}])
    p = write_json(tmp_path / "caps.json", data)
    with pytest.raises(CatalogError, match=r"caps\.json: annotations\[3\] repeats annotations\[2\]"):
        load_catalog(folder, p)
    assert load_catalog(folder, p, duplicates="keep")["a.jpg"].captions == ("A red square.", "Red", "Red")
    assert load_catalog(folder, p, duplicates="drop")["a.jpg"].captions == ("A red square.", "Red")


def test_coco_empty_caption(folder, tmp_path):
    data = dict(GOOD_COCO, annotations=[{"image_id": 1, "caption": "ok"}, {"image_id": 2, "caption": " "}])
    p = write_json(tmp_path / "caps.json", data)
    with pytest.raises(CatalogError, match=r"caps\.json: annotations\[1\]: empty caption"):
        load_catalog(folder, p)


def test_coco_missing_image(folder, tmp_path):
    data = coco([{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "gone.jpg"}], [{"image_id": 2, "caption": "x"}])
    p = write_json(tmp_path / "caps.json", data)
    with pytest.raises(CatalogError, match=r"caps\.json: images\[1\]: image 'gone.jpg' not found"):
        load_catalog(folder, p)


def test_coco_unreadable_image(folder, tmp_path):
    (folder / "bad.jpg").write_bytes(b"nope")
    data = coco([{"id": 5, "file_name": "bad.jpg"}], [{"image_id": 5, "caption": "x"}])
    p = write_json(tmp_path / "caps.json", data)
    with pytest.raises(CatalogError, match=r"caps\.json: images\[0\]: image 'bad.jpg': not a readable image"):
        load_catalog(folder, p)


def test_unknown_fmt(folder, tmp_path):
    caps = write_csv(tmp_path / "captions.csv", CSV_ROWS)
    with pytest.raises(CatalogError, match="unknown fmt"):
        load_catalog(folder, caps, fmt="tsv")


# ---------------------------------------------------------------- Catalog operations


@pytest.fixture
def cat(folder, tmp_path):
    return load_catalog(folder, write_csv(tmp_path / "captions.csv", CSV_ROWS))


def test_subset(cat):
    sub = cat.subset(["b.png", "a.jpg", "a.jpg"])
    assert sub.keys() == ["a.jpg", "b.png"]
    assert sub["a.jpg"] == cat["a.jpg"]
    with pytest.raises(CatalogError, match="nope.jpg"):
        cat.subset(["a.jpg", "nope.jpg"])


def test_without_captions_for(cat):
    held = cat.without_captions_for(["a.jpg"])
    assert held.keys() == cat.keys()
    assert held["a.jpg"].captions == () and held["a.jpg"].path == cat["a.jpg"].path
    assert held["b.png"] == cat["b.png"]
    assert "a.jpg" not in held.captions()
    assert cat["a.jpg"].captions  # original untouched
    with pytest.raises(CatalogError, match="nope.jpg"):
        cat.without_captions_for(["nope.jpg"])


def test_records_round_trip(cat, tmp_path):
    records = cat.to_records()
    assert json.loads(json.dumps(records)) == records
    assert records[0] == {"key": "a.jpg", "path": str(cat["a.jpg"].path), "captions": ["A red square .", "Something red"]}
    assert Catalog.from_records(records) == cat

    rel = cat.to_records(root=tmp_path)
    assert rel[0]["path"] == os.path.join("images", "a.jpg")
    assert Catalog.from_records(rel, root=tmp_path) == cat
    moved = Catalog.from_records(rel, root=tmp_path / "elsewhere")
    assert moved["a.jpg"].path == (tmp_path / "elsewhere" / "images" / "a.jpg").resolve()

    with pytest.raises(CatalogError, match=r"records\[0\]"):
        Catalog.from_records([{"path": "x.jpg"}])


def test_catalog_sorts_and_rejects_duplicate_keys(tmp_path):
    c = Catalog((CatalogImage("b", tmp_path / "b"), CatalogImage("a", tmp_path / "a", ["x"])))
    assert c.keys() == ["a", "b"] and c["a"].captions == ("x",)
    with pytest.raises(CatalogError, match="duplicate"):
        Catalog((CatalogImage("a", tmp_path / "a"), CatalogImage("a", tmp_path / "a2")))


def test_read_split(tmp_path):
    p = tmp_path / "test.txt"
    p.write_text("x.jpg\n\n  y.jpg  \n\n")
    assert read_split(p) == ["x.jpg", "y.jpg"]
    p.write_text("x.jpg\ny.jpg\nx.jpg\n")
    with pytest.raises(CatalogError, match=r"test\.txt: line 3 repeats line 1"):
        read_split(p)
    with pytest.raises(CatalogError, match="missing.txt"):
        read_split(tmp_path / "missing.txt")
    p.write_bytes("x.jpg\n\xff.jpg\n".encode("latin-1"))
    with pytest.raises(CatalogError, match=r"test\.txt: line 2: not UTF-8 text"):
        read_split(p)


# ---------------------------------------------------------------- demo catalog


def test_demo_catalog(tmp_path):
    images_dir, captions_csv = write_demo_catalog(tmp_path / "demo")
    assert images_dir == tmp_path / "demo" / "images" and captions_csv == tmp_path / "demo" / "captions.csv"
    cat = load_catalog(images_dir, captions_csv)
    assert cat.keys() == sorted(DEMO_CAPTIONS)
    assert 12 <= len(cat) <= 20
    for im in cat:
        assert len(im.captions) == 5 and len(set(im.captions)) == 5
        with Image.open(im.path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (224, 224)
    assert not [p for p in (tmp_path / "demo").rglob("*") if p.name.startswith(".")]  # no temp leftovers

    # Idempotent: a second run leaves the same files untouched.
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "demo").rglob("*") if p.is_file()}
    assert write_demo_catalog(tmp_path / "demo") == (images_dir, captions_csv)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "demo").rglob("*") if p.is_file()} == stamps


def test_demo_queries_are_held_out():
    captions = {c.strip().lower().rstrip(" .") for caps in DEMO_CAPTIONS.values() for c in caps}
    queries = demo_queries()
    assert queries
    for text, key in queries:
        assert key in DEMO_CAPTIONS
        assert text.strip().lower().rstrip(" .") not in captions
    assert {k for _, k in queries} == set(DEMO_CAPTIONS)
    assert len({t for t, _ in queries}) == len(queries)


# ---------------------------------------------------------------- real Flickr8k


def flickr8k_dir() -> Path:
    env = os.environ.get("GENRET_FLICKR8K")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared/data/flickr8k"


def test_real_flickr8k():
    root = flickr8k_dir()
    if not (root / "captions.csv").is_file() or not (root / "images").is_dir():
        pytest.skip(f"Flickr8k not present at {root}")
    # The published file repeats 10 (image, caption) rows; the canonical 40455 count keeps them.
    with pytest.raises(CatalogError, match=r"captions\.csv: row \d+ repeats row \d+"):
        load_catalog(root / "images", root / "captions.csv", verify_images=False)
    cat = load_catalog(root / "images", root / "captions.csv", verify_images=False, duplicates="keep")
    assert len(cat) == 8091
    assert sum(len(im.captions) for im in cat) == 40455
    assert all(im.captions for im in cat)
    splits = {name: read_split(root / "splits" / f"{name}.txt") for name in ("train", "dev", "test")}
    assert [len(s) for s in splits.values()] == [6000, 1000, 1000]
    assert all(k in cat for s in splits.values() for k in s)
    assert not set(splits["train"]) & set(splits["test"])
    assert len(cat.subset(splits["test"])) == 1000
