"""The procedural tiny-world data: determinism, balance, distinct classes, conversions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddcore.tiny.data import (
    ATTRIBUTE_NAMES,
    CLASS_NAMES,
    COLOUR_PAIRS,
    MIN_COLOUR_DISTANCE,
    PALETTE,
    make_dataset,
    make_dataset_with_attributes,
    to_model_range,
    to_uint8,
    to_unit,
)


def test_same_seed_same_images_other_seed_other_images():
    a, la = make_dataset(200, 32, 10, seed=3)
    b, lb = make_dataset(200, 32, 10, seed=3)
    c, lc = make_dataset(200, 32, 10, seed=4)
    assert a.dtype == np.uint8 and a.shape == (200, 32, 32, 3)
    assert la.dtype == np.int64 and la.shape == (200,)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert not np.array_equal(la, lc)


def test_labels_balanced_and_in_range():
    for n, k in [(1000, 10), (997, 12), (50, 2)]:
        _, labels = make_dataset(n, 32, k, seed=0)
        counts = np.bincount(labels, minlength=k)
        assert len(counts) == k and counts.max() - counts.min() <= 1


def test_classes_are_visually_distinct():
    """Per-class mean spectra differ between classes far more than between two halves of a class.

    Positions are random, so raw mean images are blobs; the magnitude of the 2D Fourier transform
    of the foreground is translation-invariant and keeps each class's shape signature.
    """
    images, labels = make_dataset(4000, 32, len(CLASS_NAMES), seed=1)
    gray = images.astype(np.float32).mean(axis=3) / 255.0
    # the foreground whichever colour it has: distance from the image's median (background) value
    fg = np.abs(gray - np.median(gray.reshape(len(gray), -1), axis=1)[:, None, None])
    spec = np.abs(np.fft.fft2(fg))
    spec = spec / spec[:, :1, :1]  # divide by the DC term: independent of the colour contrast
    k, half = len(CLASS_NAMES), len(labels) // 2
    means_a = np.stack([spec[:half][labels[:half] == c].mean(0) for c in range(k)])
    means_b = np.stack([spec[half:][labels[half:] == c].mean(0) for c in range(k)])
    within = np.abs(means_a - means_b).mean(axis=(1, 2))  # same class, disjoint samples
    between = np.abs(means_a[:, None] - means_a[None]).mean(axis=(2, 3))
    np.fill_diagonal(between, np.inf)
    # measured: the nearest other class is 2.4x-5.9x farther than the class's own other half
    assert (between.min(axis=1) > 2.0 * within).all(), (within, between.min(axis=1))


def test_orientation_pairs_are_told_apart_by_structure():
    """Horizontal vs vertical stripes differ in which axis varies (rotation is capped at 15 deg)."""
    images, labels = make_dataset(600, 32, 10, seed=2)
    gray = images.astype(np.float32).mean(axis=3)
    h = gray[labels == CLASS_NAMES.index("hstripes")]
    v = gray[labels == CLASS_NAMES.index("vstripes")]

    def row_vs_col(x):  # variance along rows (across columns) minus along columns
        return (x.var(axis=2).mean(axis=1) - x.var(axis=1).mean(axis=1)).mean()

    assert row_vs_col(h) < 0 < row_vs_col(v)


def test_colours_contrast_and_come_from_the_palette():
    images, labels, attrs = make_dataset_with_attributes(300, 32, 10, seed=5)
    assert attrs.shape == (300, len(ATTRIBUTE_NAMES))
    light, dark = attrs[:, 0:3], attrs[:, 3:6]
    assert (np.linalg.norm(light - dark, axis=1) >= MIN_COLOUR_DISTANCE - 1e-6).all()
    # every image's two colours are a valid palette pair
    dist = np.abs(light[:, None, :] - PALETTE[None]).sum(-1)
    assert (dist.min(axis=1) < 1e-6).all()
    assert len(COLOUR_PAIRS) > 50
    # the corner pixel of a shape image is the background: one of the two colours
    shapes = ~np.isnan(attrs[:, 6])
    corner = images[shapes, 0, 0, :].astype(np.float32) / 255.0
    near = np.minimum(np.abs(corner - light[shapes]).max(1), np.abs(corner - dark[shapes]).max(1))
    assert (near < 1.5 / 255).all()
    # textures carry no centre, shapes carry one inside the image
    assert np.isnan(attrs[~shapes, 6]).all() and (np.abs(attrs[shapes, 6:8]) < 1).all()


def test_bad_arguments_fail():
    with pytest.raises(ValueError, match="num_classes"):
        make_dataset(10, 32, len(CLASS_NAMES) + 1)
    with pytest.raises(ValueError, match="image_size"):
        make_dataset(10, 4, 10)


def test_conversions_round_trip():
    images, _ = make_dataset(8, 32, 10, seed=0)
    unit = to_unit(images)
    m11 = to_model_range(images)
    assert unit.shape == (8, 3, 32, 32) and unit.dtype == torch.float32
    assert unit.min() >= 0.0 and unit.max() <= 1.0
    assert m11.min() >= -1.0 and m11.max() <= 1.0
    torch.testing.assert_close(m11, unit * 2 - 1)
    np.testing.assert_array_equal(to_uint8(unit), images)
