"""Encoders and two-tower on real pretrained weights (no mocks); synthetic data keeps training fast."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image, ImageDraw

from genret.alignment import (
    dense_rank,
    hubness,
    image_embeddings,
    load_two_tower,
    recall_at_k,
    save_two_tower,
    text_embeddings,
    train_two_tower,
    validated_epochs,
)
from genret.encoders import ImageEncoder, TextEncoder


def test_image_encoder_features(tmp_path):
    paths = []
    for i, color in enumerate([(220, 30, 30), (30, 200, 40), (20, 40, 210), (240, 240, 240)]):
        im = Image.new("RGB", (64 + 16 * i, 48), color)
        ImageDraw.Draw(im).ellipse((8, 8, 40, 40), fill=(255 - color[0], 128, color[2]))
        paths.append(tmp_path / f"im{i}.png")
        im.save(paths[-1])
    enc = ImageEncoder(device="cpu")
    feats = enc.encode_paths(paths + [paths[0]], batch_size=3, progress=False)
    assert feats.shape == (5, ImageEncoder.dim) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    np.testing.assert_array_equal(feats[0], feats[4])
    assert not np.allclose(feats[0], feats[1])


def test_image_encoder_sees_a_big_photo_as_decoded_whole_and_a_turned_one_upright(tmp_path):
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((1792, 1792), Image.BICUBIC)
    photo.save(tmp_path / "big.jpg", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned clockwise; shown turned back
    photo.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "turned.jpg", quality=92, exif=exif)
    enc = ImageEncoder(device="cpu")
    # encode_paths decodes big.jpg at 1/4 scale (448 px); encode_images gets it decoded whole
    big, turned = enc.encode_paths([tmp_path / "big.jpg", tmp_path / "turned.jpg"], progress=False)
    [whole] = enc.encode_images([Image.open(tmp_path / "big.jpg")])
    cosine = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cosine(big, whole) > 0.99 and cosine(turned, whole) > 0.99
    [sideways] = enc.encode_images([photo.transpose(Image.Transpose.ROTATE_270)])
    assert cosine(sideways, whole) < 0.95


def test_text_encoder_semantics():
    texts = ["a dog runs on grass", "a puppy running on a lawn", "a rocket on a launch pad"]
    emb = TextEncoder(device="cpu").encode(texts)
    assert emb.shape == (3, TextEncoder.dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


@pytest.fixture(scope="module")
def synthetic():
    """200 'images' of random features; each caption is a fixed linear map of its image plus noise."""
    rng = np.random.default_rng(0)
    n_images, n_captions = 200, 4
    images = rng.normal(size=(n_images, 1280)).astype(np.float32)
    proj = rng.normal(size=(1280, 384)).astype(np.float32) / np.sqrt(1280)
    owner = np.repeat(np.arange(n_images), n_captions)
    texts = images[owner] @ proj + 1.0 * rng.normal(size=(len(owner), 384)).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    held_out = np.arange(len(owner)) % n_captions == 0  # one caption per image never trained on
    model = train_two_tower(
        images, texts[~held_out], owner[~held_out], dim=64, hidden=256, epochs=15, batch_size=200, device="cpu", progress=False
    )
    return model, images, texts[held_out], owner[held_out]


def test_two_tower_retrieves_held_out_captions(synthetic):
    model, images, queries, targets = synthetic
    ranked, scores = dense_rank(text_embeddings(model, queries), image_embeddings(model, images), k=10)
    assert ranked.shape == scores.shape == (len(queries), 10)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    recall = recall_at_k(ranked, targets)
    assert set(recall) == {"R@1", "R@5", "R@10"}
    assert recall["R@1"] > 0.8, recall
    assert recall["R@1"] <= recall["R@5"] <= recall["R@10"]


def test_two_tower_save_load_round_trip(synthetic, tmp_path):
    model, images, queries, _ = synthetic
    path = tmp_path / "two_tower.safetensors"
    save_two_tower(model, path)
    loaded = load_two_tower(path)
    assert loaded.config == model.config
    np.testing.assert_array_equal(image_embeddings(loaded, images), image_embeddings(model, images))
    np.testing.assert_array_equal(text_embeddings(loaded, queries), text_embeddings(model, queries))


def test_validated_epochs_stop_after_the_held_out_captions_stop_improving():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(60, 32)).astype(np.float32)
    owner = np.repeat(np.arange(60), 2)
    texts = (images @ rng.normal(size=(32, 24)))[owner] + 3.0 * rng.normal(size=(120, 24))  # noisy: overfits
    texts = (texts / np.linalg.norm(texts, axis=1, keepdims=True)).astype(np.float32)
    options = dict(dim=16, hidden=64, batch_size=32, device="cpu", progress=False)
    chosen = validated_epochs(images, texts, owner, max_epochs=40, held_out_share=0.2, patience=2, **options)
    assert chosen["held_out_images"] == 12
    scores = chosen["held_out_mean_recall"]
    assert chosen["epochs"] == int(np.argmax(scores)) + 1
    assert len(scores) == chosen["epochs"] + 2 or len(scores) == 40  # stopped two epochs past the best
    assert validated_epochs(images, texts, owner, max_epochs=40, held_out_share=0.1, **options) is None  # 6 images


def test_hubness_is_the_mean_similarity_to_the_nearest_queries():
    bank = np.eye(4, dtype=np.float32)[[0, 0, 0, 1, 2]]  # three queries on axis 0, one each on 1 and 2
    images = np.eye(4, dtype=np.float32)[[0, 1, 3]]
    np.testing.assert_allclose(hubness(images, bank, neighbors=2), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(hubness(images, bank, neighbors=3, batch_size=2), [1.0, 1 / 3, 0.0])
    np.testing.assert_allclose(hubness(images, bank, neighbors=50), [3 / 5, 1 / 5, 0.0])  # clamped to the bank
    assert hubness(images, bank[:0]).tolist() == [0.0, 0.0, 0.0]


def test_recall_at_k_counts_hits():
    ranked = np.array([[3, 1, 2], [0, 2, 1], [2, 0, 1]])
    assert recall_at_k(ranked, np.array([3, 2, 5]), ks=(1, 2, 3)) == {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 2 / 3}
