"""The embedded default catalog: photos that ship inside scikit-image, captioned here.

It lets the product (and its tests) run end to end with no download and no user data.
Only skimage.data images bundled in the wheel are used; the ones fetched through pooch
would need the network.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

IMAGE_SIZE = 224

# key -> skimage.data function name (motorcycle is the left frame of the stereo pair).
_SOURCES: dict[str, str] = {
    "astronaut.jpg": "astronaut",
    "brick.jpg": "brick",
    "cameraman.jpg": "camera",
    "chelsea.jpg": "chelsea",
    "clock.jpg": "clock",
    "coffee.jpg": "coffee",
    "coins.jpg": "coins",
    "grass.jpg": "grass",
    "gravel.jpg": "gravel",
    "horse.jpg": "horse",
    "hubble_deep_field.jpg": "hubble_deep_field",
    "immunohistochemistry.jpg": "immunohistochemistry",
    "moon.jpg": "moon",
    "motorcycle.jpg": "stereo_motorcycle",
    "page.jpg": "page",
    "retina.jpg": "retina",
    "rocket.jpg": "rocket",
    "text.jpg": "text",
}

DEMO_CAPTIONS: dict[str, list[str]] = {
    "astronaut.jpg": [
        "A smiling woman astronaut in an orange space suit poses in front of an American flag.",
        "An astronaut with short curly hair holds her helmet under her arm.",
        "A woman in an orange flight suit with mission patches smiles for a portrait.",
        "Official portrait of a female astronaut with a model space shuttle behind her.",
        "A lady in an orange pressure suit stands beside a US flag and a shuttle model.",
    ],
    "brick.jpg": [
        "A black and white photo of a brick wall laid in neat rows.",
        "Rows of rectangular bricks seen straight on in grayscale.",
        "A close-up of gray brick paving with thin mortar lines.",
        "A pattern of long narrow bricks stacked in a staggered layout.",
        "A monochrome texture of a brick surface.",
    ],
    "cameraman.jpg": [
        "A man in a dark coat looks through a camera on a tripod.",
        "A black and white photo of a photographer standing in a grassy field.",
        "A cameraman adjusts an old camera mounted on a tripod outdoors.",
        "A man in a long coat films on a lawn with buildings in the distance.",
        "A grayscale picture of a person operating a tripod camera in a park.",
    ],
    "chelsea.jpg": [
        "A close-up of a tabby cat with green eyes and long white whiskers.",
        "A brown striped cat stares at the camera.",
        "The face of a ginger tabby kitten with a pink nose.",
        "A cat with yellow-green eyes looks up with its ears pointed forward.",
        "A striped house cat gazing attentively at something.",
    ],
    "clock.jpg": [
        "A blurry gray photo of a round clock in motion.",
        "A motion-blurred clock face against a plain gray background.",
        "A small round clock that is out of focus in a black and white image.",
        "A grayscale picture of a moving clock smeared by motion blur.",
        "A round shiny object, a clock, blurred in the middle of a gray frame.",
    ],
    "coffee.jpg": [
        "A cup of espresso on a red saucer with a metal spoon.",
        "A red coffee cup sitting on a wooden table.",
        "An espresso with light brown crema in a small cup with a white inside.",
        "A spoon resting on a saucer next to a cup of coffee on a wood surface.",
        "A hot drink served in a red cup and saucer seen from above.",
    ],
    "coins.jpg": [
        "Rows of old coins laid out on a dark background.",
        "A black and white photo of ancient silver coins arranged in a grid.",
        "Twenty-four coins with faces and figures on them in four rows.",
        "A collection of antique coins displayed on a black cloth.",
        "Many round old coins of slightly different sizes lined up neatly.",
    ],
    "grass.jpg": [
        "A close-up of a patch of grass in black and white.",
        "Dense blades of grass filling the whole frame.",
        "A grayscale texture of short grass and leaves on the ground.",
        "A top-down view of a lawn with scattered dry blades.",
        "Thin grass stems tangled together in a monochrome photo.",
    ],
    "gravel.jpg": [
        "A black and white close-up of small gravel stones.",
        "Lots of little pebbles covering the ground.",
        "A grayscale texture of crushed rock seen from above.",
        "A surface of tightly packed small stones.",
        "Gray gravel filling the entire picture.",
    ],
    "horse.jpg": [
        "A black silhouette of a horse on a white background.",
        "The dark outline of a standing horse facing right.",
        "A solid black shape of a horse with its tail hanging down.",
        "A simple black and white cutout of a horse in profile.",
        "A horse drawn as a black shadow against plain white.",
    ],
    "hubble_deep_field.jpg": [
        "Hundreds of colorful galaxies scattered across black space.",
        "A deep space telescope image full of tiny stars and galaxies.",
        "Small bright spots of red, blue and white light on a dark sky.",
        "A view of distant galaxies taken by a space telescope.",
        "A black sky dotted with many faint glowing objects.",
    ],
    "immunohistochemistry.jpg": [
        "A microscope image of tissue stained brown and blue.",
        "Brown stained cells lining curved structures under a microscope.",
        "A stained tissue sample with brown glands and small blue nuclei.",
        "A colorful slide of human tissue viewed through a microscope.",
        "Cells colored brown by a stain surrounded by pale blue tissue.",
    ],
    "moon.jpg": [
        "A gray close-up of the surface of the moon.",
        "A black and white view of lunar ground with small craters.",
        "A flat gray surface with a few dark spots and a round crater.",
        "A grayscale image of rocky moon terrain seen from above.",
        "Part of the lunar surface with a crater near the top.",
    ],
    "motorcycle.jpg": [
        "A red motorcycle parked in a garage.",
        "A red and black motorbike stands on a concrete floor in front of shelves.",
        "A motorcycle on its kickstand inside a cluttered workshop.",
        "A shiny red bike parked indoors next to boxes and a chair.",
        "A street motorcycle with a black seat in a storage room.",
    ],
    "page.jpg": [
        "A printed page of text titled Region-based segmentation.",
        "A scanned book page with a heading and a paragraph of text.",
        "Black text on a white page with a line of code at the bottom.",
        "A grayscale photo of a page explaining markers for coins and background.",
        "A page from a technical document with a title and several lines of writing.",
    ],
    "retina.jpg": [
        "A photo of the back of a human eye showing red blood vessels.",
        "An orange-red retina with the bright optic disc on the left.",
        "A round medical image of an eye fundus on a black background.",
        "Blood vessels branching across the red surface of a retina.",
        "A close-up eye scan with vessels spreading out from a bright spot.",
    ],
    "rocket.jpg": [
        "A white rocket standing on a launch pad at dusk.",
        "A rocket between tall towers lit up against a dark blue sky.",
        "A launch pad at twilight with bright lights around a tall rocket.",
        "A space rocket ready for launch surrounded by lightning towers.",
        "A tall white rocket in the evening with lights glowing at its base.",
    ],
    "text.jpg": [
        "Handwritten math equations on a sheet of paper.",
        "A black and white photo of handwritten formulas and integrals.",
        "Math written in pen on lined paper, seen at an angle.",
        "A page of handwritten calculations with fractions and symbols.",
        "Close-up of scribbled equations in a notebook.",
    ],
}

_QUERIES: list[tuple[str, str]] = [
    ("female astronaut in an orange suit", "astronaut.jpg"),
    ("space program portrait with a flag", "astronaut.jpg"),
    ("wall made of bricks", "brick.jpg"),
    ("gray brick pattern", "brick.jpg"),
    ("photographer with a tripod on a field", "cameraman.jpg"),
    ("man shooting with an old film camera", "cameraman.jpg"),
    ("tabby cat face close up", "chelsea.jpg"),
    ("kitty with green eyes", "chelsea.jpg"),
    ("blurred clock", "clock.jpg"),
    ("a clock moving so fast it is blurry", "clock.jpg"),
    ("espresso in a red cup", "coffee.jpg"),
    ("coffee with a spoon on a wooden table", "coffee.jpg"),
    ("ancient coins in rows", "coins.jpg"),
    ("old money laid out on black", "coins.jpg"),
    ("grass texture", "grass.jpg"),
    ("close view of a lawn", "grass.jpg"),
    ("pile of small pebbles", "gravel.jpg"),
    ("crushed stone texture", "gravel.jpg"),
    ("horse silhouette", "horse.jpg"),
    ("black shape of a horse standing", "horse.jpg"),
    ("galaxies in deep space", "hubble_deep_field.jpg"),
    ("Hubble picture of the night sky", "hubble_deep_field.jpg"),
    ("stained tissue under a microscope", "immunohistochemistry.jpg"),
    ("brown and blue histology slide", "immunohistochemistry.jpg"),
    ("craters on the lunar surface", "moon.jpg"),
    ("gray moon ground", "moon.jpg"),
    ("red motorbike in a garage", "motorcycle.jpg"),
    ("motorcycle parked indoors", "motorcycle.jpg"),
    ("scanned page about segmentation", "page.jpg"),
    ("printed document with a heading", "page.jpg"),
    ("blood vessels inside an eye", "retina.jpg"),
    ("retina scan", "retina.jpg"),
    ("rocket on the launch pad at night", "rocket.jpg"),
    ("spacecraft waiting for liftoff", "rocket.jpg"),
    ("handwritten equations", "text.jpg"),
    ("math formulas written by hand", "text.jpg"),
]


def demo_queries() -> list[tuple[str, str]]:
    """Paraphrases kept out of DEMO_CAPTIONS so retrieval is measured on unseen wording."""
    return list(_QUERIES)


def _load_rgb(name: str):
    import numpy as np
    import skimage.data
    from PIL import Image
    from skimage.util import img_as_ubyte

    arr = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        arr = arr[0]
    arr = img_as_ubyte(np.asarray(arr))  # horse is boolean
    return Image.fromarray(arr).convert("RGB")


def _atomic_write(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return  # unchanged: leave mtimes alone so reruns are no-ops
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_demo_catalog(dest: str | Path) -> tuple[Path, Path]:
    from PIL import Image

    dest = Path(dest)
    images_dir = dest / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for key, name in _SOURCES.items():
        buf = io.BytesIO()
        img = _load_rgb(name).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        img.save(buf, format="JPEG", quality=90)
        _atomic_write(images_dir / key, buf.getvalue())

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["image", "caption"])
    for key in sorted(DEMO_CAPTIONS):
        for caption in DEMO_CAPTIONS[key]:
            writer.writerow([key, caption])
    captions_csv = dest / "captions.csv"
    _atomic_write(captions_csv, text.getvalue().encode("utf-8"))
    return images_dir, captions_csv
