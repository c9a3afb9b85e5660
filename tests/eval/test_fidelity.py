"""torch-fidelity plumbing: a fixed random conv net stands in for the evaluator network, so these
tests check registration, extraction and reference loading, not the evaluator's quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_fidelity
from eval_helpers import RandomConvEvaluator
from PIL import Image
from torch.utils.data import Dataset

from ddcore.eval.fidelity import (
    EvaluationUnavailable,
    extract,
    inception_extractor,
    inception_weights_path,
    load_reference,
    reference_from_images,
    save_reference_stats,
    tiny_extractor,
    tiny_world_reference,
    to_uint8,
)
from ddcore.eval.metrics import (
    fid_from_features,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)


class U8Dataset(Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 16, 16, generator=g) * 0.6 + 0.2 + shift).clamp(0, 1)
    return to_uint8(x)


def test_to_uint8_rounds_like_png_writers():
    x = (
        torch.tensor([0.0, 0.5 / 255, 1.49 / 255, 1.51 / 255, 1.0, 1.3, -0.2])
        .view(1, 1, 1, 7)
        .expand(1, 3, 1, 7)
    )
    assert to_uint8(x)[0, 0, 0].tolist() == [0, 0, 1, 2, 255, 255, 0]  # round half to even at 0.5
    assert to_uint8(torch.rand(2, 3, 20, 20), size=8).shape == (2, 3, 8, 8)


def test_registered_extractor_matches_torch_fidelity_calculate_metrics():
    ev = RandomConvEvaluator()
    ext = tiny_extractor(ev, name="ddcore-test-random")
    a, b = _images(120, 0), _images(100, 1, shift=0.15)
    fa, za = extract(ext, a)
    fb, _ = extract(ext, b)
    theirs = torch_fidelity.calculate_metrics(
        input1=U8Dataset(a),
        input2=U8Dataset(b),
        feature_extractor="ddcore-test-random",
        fid=True,
        isc=True,
        kid=True,
        prc=True,
        isc_splits=1,
        kid_subsets=10,
        kid_subset_size=50,
        rng_seed=3,
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
        batch_size=32,
    )
    assert fid_from_features(fa, fb) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert inception_score(za)[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    p, r = precision_recall(fa, fb)
    assert p == pytest.approx(theirs["precision"], abs=1e-6)
    assert r == pytest.approx(theirs["recall"], abs=1e-6)
    kid = kernel_inception_distance(fa, fb, subsets=10, subset_size=50, seed=3)[0]
    assert kid == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert fid_from_features(fa, fb) > 0.01  # the shifted set really is different in this space


def test_reregistering_replaces_binding_and_logits_come_from_the_evaluator():
    ev1, ev2 = RandomConvEvaluator(seed=1), RandomConvEvaluator(seed=2)
    x = _images(4, 5)
    tiny_extractor(ev1, name="ddcore-test-rebind")
    ext2 = tiny_extractor(ev2, name="ddcore-test-rebind")
    f, z = extract(ext2, x)
    with torch.no_grad():
        torch.testing.assert_close(z, ev2(x.float() / 255))
        torch.testing.assert_close(f, ev2.features(x.float() / 255))
    with pytest.raises(ValueError):
        tiny_extractor(ev1, name="inception-v3-compat")  # never overwrite torch-fidelity's own


def test_npz_images_stats_and_folder_references_agree(tmp_path):
    ext = tiny_extractor(RandomConvEvaluator(), name="ddcore-test-ref")
    imgs = _images(30, 7)
    direct = reference_from_images(imgs, ext, "direct")
    nhwc = imgs.permute(0, 2, 3, 1).numpy()

    np.savez(tmp_path / "imgs.npz", arr_0=nhwc)
    from_npz = load_reference(tmp_path / "imgs.npz", ext)
    assert from_npz.kind == "npz-images" and from_npz.n == 30
    torch.testing.assert_close(from_npz.features, direct.features)

    save_reference_stats(direct, tmp_path / "stats.npz")
    stats = load_reference(tmp_path / "stats.npz", ext)
    assert stats.kind == "npz-stats" and stats.features is None and stats.n == 30
    np.testing.assert_allclose(stats.sigma, direct.sigma)

    # ADM layout: images plus mu/sigma -> stored statistics define FID, images give features
    np.savez(tmp_path / "adm.npz", arr_0=nhwc, mu=direct.mu + 1.0, sigma=direct.sigma)
    adm = load_reference(tmp_path / "adm.npz", ext)
    assert adm.kind == "npz-stats+images"
    np.testing.assert_allclose(adm.mu, direct.mu + 1.0)
    assert adm.features is not None

    torch.save(
        {"m": torch.from_numpy(direct.mu), "s": torch.from_numpy(direct.sigma)}, tmp_path / "statistic.pth"
    )
    pth = load_reference(tmp_path / "statistic.pth", ext)
    np.testing.assert_allclose(pth.mu, direct.mu)

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(nhwc):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    from_folder = load_reference(folder, ext)
    torch.testing.assert_close(from_folder.features, direct.features)


def test_bad_references_raise_evaluation_unavailable(tmp_path):
    ext = tiny_extractor(RandomConvEvaluator(), name="ddcore-test-bad")
    with pytest.raises(EvaluationUnavailable, match="VIRTUAL_imagenet256_labeled"):
        load_reference(tmp_path / "missing.npz", ext)
    np.savez(tmp_path / "wrong.npz", foo=np.zeros(3))
    with pytest.raises(EvaluationUnavailable, match="arr_0"):
        load_reference(tmp_path / "wrong.npz", ext)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationUnavailable):
        load_reference(tmp_path / "empty", ext)


def test_missing_inception_weights_is_a_clear_error(tmp_path, monkeypatch):
    from ddcore.settings import get_settings

    with pytest.raises(EvaluationUnavailable, match="not found"):
        inception_extractor(weights_path=tmp_path / "nope.pth")
    monkeypatch.setenv("DD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    get_settings.cache_clear()
    try:
        with pytest.raises(EvaluationUnavailable, match="copy it to"):
            inception_weights_path(allow_download=False)
        # a file that is not a plain state dict is refused before torch-fidelity unpickles it
        bad = tmp_path / "bad.pth"
        torch.save({"w": torch.zeros(1), "obj": RandomConvEvaluator}, bad)
        with pytest.raises(EvaluationUnavailable, match="plain Inception state dict"):
            inception_extractor(weights_path=bad)
    finally:
        get_settings.cache_clear()


def test_tiny_world_reference_is_deterministic_and_held_out():
    ext = tiny_extractor(RandomConvEvaluator(), name="ddcore-test-world")
    r1 = tiny_world_reference(ext, n=24, image_size=16, num_classes=4, seed=0)
    r2 = tiny_world_reference(ext, n=24, image_size=16, num_classes=4, seed=0)
    assert r1.kind == "world" and r1.n == 24 and r1.features.shape == (24, 32)
    torch.testing.assert_close(r1.features, r2.features)
    assert r1.meta["seed"] != 0
