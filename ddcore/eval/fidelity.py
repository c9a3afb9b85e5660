"""Feature extraction through torch-fidelity, and the reference statistics we compare against.

Every image that is scored goes through a torch-fidelity feature extractor: the tiny world's
evaluator, registered here as one, or torch-fidelity's `inception-v3-compat` (the TF-FID
Inception) for ImageNet. Both take uint8 (B, 3, H, W), exactly what a PNG/npz round trip gives,
so scoring from memory, from a folder or from an npz sees the same pixels. The metrics
themselves are computed in :mod:`ddcore.eval.metrics` from the extracted features, so a
sampler's features are extracted once and reused for FID, IS, precision/recall and KID.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from tqdm.auto import tqdm

from ddcore.eval.metrics import feature_stats

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
TINY_NAME = "ddcore-tiny"


class EvaluationUnavailable(RuntimeError):
    """A metric cannot be computed here (missing weights or reference); the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
def to_uint8(images: Tensor, size: int | None = None) -> Tensor:
    """float [0, 1] (B, 3, H, W) -> uint8 (B, 3, H, W), rounded as the PNG writers round.

    `size` resizes first (bicubic, antialiased), as LlamaGen's protocol does for 384-px models
    scored at 256.
    """
    x = images.detach().float()
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def nhwc_to_nchw(images: np.ndarray | Tensor) -> Tensor:
    t = torch.as_tensor(images)
    if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != torch.uint8:
        raise ValueError(f"need uint8 (N, H, W, 3) images, got {tuple(t.shape)} {t.dtype}")
    return t.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# feature extractors
# --------------------------------------------------------------------------------------------
class TinyFeatureExtractor(FeatureExtractorBase):
    """The tiny world's evaluator as a torch-fidelity extractor: 'features' and 'logits_unbiased'.

    torch-fidelity builds extractors from a registered *class*, so `register_tiny_evaluator`
    creates a subclass bound to one evaluator instance. The evaluator's logits are over the
    world's own classes, so class accuracy is meaningful (`labels_match`).
    """

    evaluator_module: nn.Module | None = None
    labels_match = True

    def __init__(self, name: str, features_list: Sequence[str], **kwargs):
        super().__init__(name, list(features_list))
        if type(self).evaluator_module is None:
            raise TypeError("use register_tiny_evaluator(evaluator) to bind an evaluator first")
        self.evaluator = type(self).evaluator_module

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits_unbiased")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits_unbiased" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {tuple(x.shape)} {x.dtype}")
        img = x.float() / 255.0
        feats = self.evaluator.features(img)
        out = {"features": feats.float()}
        if "logits_unbiased" in self.features_list:
            head = getattr(self.evaluator, "head", None)
            logits = head(feats) if head is not None else self.evaluator(img)
            out["logits_unbiased"] = logits.float()
        return tuple(out[k] for k in self.features_list)


def register_tiny_evaluator(evaluator: nn.Module, name: str = TINY_NAME) -> type[TinyFeatureExtractor]:
    """Register `evaluator` with torch-fidelity under `name` (replacing an earlier tiny binding).

    Afterwards `torch_fidelity.calculate_metrics(..., feature_extractor=name)` scores folders or
    datasets in the evaluator's feature space.
    """
    existing = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if existing is not None:
        if not issubclass(existing, TinyFeatureExtractor):
            raise ValueError(f"feature extractor {name!r} is already registered by someone else")
        del FEATURE_EXTRACTORS_REGISTRY[name]
    cls = type("BoundTinyFeatureExtractor", (TinyFeatureExtractor,), {"evaluator_module": evaluator.eval()})
    register_feature_extractor(name, cls)
    return cls


def tiny_extractor(evaluator: nn.Module, name: str = TINY_NAME) -> TinyFeatureExtractor:
    """A ready-to-call extractor instance for the tiny evaluator (registered as a side effect)."""
    cls = register_tiny_evaluator(evaluator, name)
    return cls(name, ["features", "logits_unbiased"]).eval().requires_grad_(False)


def inception_weights_path(weights_path: str | Path | None = None, allow_download: bool = True) -> Path:
    """Locate (or fetch once) torch-fidelity's TF-FID Inception weights.

    Looked up, in order: `weights_path`; `<DD_CACHE_DIR>/<file>`; torch hub's checkpoint dir.
    If none exists and `allow_download`, it is downloaded into DD_CACHE_DIR. Without network
    this raises `EvaluationUnavailable` naming the file to copy and where to put it.
    """
    from ddcore.settings import get_settings

    if weights_path is not None:
        p = Path(weights_path)
        if not p.is_file():
            raise EvaluationUnavailable(f"Inception weights not found at {p}")
        return p
    cache = get_settings().cache_dir / INCEPTION_FILE
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    for p in (cache, hub):
        if p.is_file():
            return p
    how = (
        f"download {INCEPTION_URL} on a machine with internet and copy it to {cache} "
        "(or set DD_CACHE_DIR, or pass the file's path as weights_path)"
    )
    if not allow_download:
        raise EvaluationUnavailable(f"ImageNet FID needs the Inception weights {INCEPTION_FILE}: {how}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(cache), progress=True)
    except Exception as err:  # no network, proxy, DNS, HTTP error: all mean "not available here"
        raise EvaluationUnavailable(
            f"could not download the Inception weights ({type(err).__name__}: {err}); {how}"
        ) from None
    return cache


def inception_extractor(
    weights_path: str | Path | None = None, allow_download: bool = True
) -> FeatureExtractorBase:
    """torch-fidelity's `inception-v3-compat` with pool ('2048') features and unbiased logits.

    The file is first read with `weights_only=True`, so only a plain tensor state dict is
    accepted before torch-fidelity's own loader reads it.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = inception_weights_path(weights_path, allow_download)
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EvaluationUnavailable(
            f"{path} is not a plain Inception state dict ({err}); delete it and re-fetch"
        ) from None
    ext = FeatureExtractorInceptionV3(
        INCEPTION_NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path), verbose=False
    )
    return ext.eval().requires_grad_(False)


def as_extractor(evaluator: nn.Module | FeatureExtractorBase | None) -> FeatureExtractorBase:
    """Accept a ready torch-fidelity extractor, wrap a tiny-world evaluator network, or (None)
    load the ImageNet Inception."""
    if evaluator is None:
        return inception_extractor()
    if isinstance(evaluator, FeatureExtractorBase):
        return evaluator
    if hasattr(evaluator, "features"):
        return tiny_extractor(evaluator)
    raise TypeError(f"{type(evaluator).__name__} is neither a torch-fidelity extractor nor has .features()")


def feature_keys(extractor: FeatureExtractorBase) -> tuple[str, str]:
    """(feature layer used for FID/PR/KID, logits layer used for IS) of an extractor."""
    return extractor.get_default_feature_layer_for_metric(
        "fid"
    ), extractor.get_default_feature_layer_for_metric("isc")


def _module_device(m: nn.Module) -> torch.device:
    p = next(m.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def extract(extractor: FeatureExtractorBase, images_u8: Tensor) -> tuple[Tensor, Tensor]:
    """(features, logits) as float32 CPU tensors for one uint8 batch."""
    fkey, lkey = feature_keys(extractor)
    out = extractor.convert_features_tuple_to_dict(extractor(images_u8.to(_module_device(extractor))))
    return out[fkey].float().cpu(), out[lkey].float().cpu()


def extract_batches(
    extractor: FeatureExtractorBase,
    batches: Iterable[Tensor],
    total: int | None = None,
    desc: str = "features",
) -> tuple[Tensor, Tensor]:
    """Concatenated (features, logits) over an iterable of uint8 batches, with a progress bar."""
    feats, logits = [], []
    with tqdm(total=total, desc=desc, unit="img", mininterval=2.0, disable=total is None) as bar:
        for b in batches:
            f, z = extract(extractor, b)
            feats.append(f)
            logits.append(z)
            bar.update(b.shape[0])
    if not feats:
        raise ValueError("no images to extract features from")
    return torch.cat(feats), torch.cat(logits)


def _chunks(images: Tensor | np.ndarray, batch_size: int, nhwc: bool) -> Iterator[Tensor]:
    for i in range(0, images.shape[0], batch_size):
        b = images[i : i + batch_size]
        yield nhwc_to_nchw(np.ascontiguousarray(b)) if nhwc else torch.as_tensor(b)


# --------------------------------------------------------------------------------------------
# running a sampler
# --------------------------------------------------------------------------------------------
@dataclass
class SamplerRun:
    """What one sampler produced for the evaluation labels/seeds, reduced to what metrics need."""

    features: Tensor
    logits: Tensor
    tokens: Tensor | None
    seconds: float  # wall time of sampling (not feature extraction) over all images

    @property
    def n(self) -> int:
        return self.features.shape[0]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sample_tokens_and_images(
    sampler, labels: Tensor, seeds: Sequence[int], decode=None
) -> tuple[Tensor, Tensor]:
    """Tokens and images of one batch, without sampling twice where that can be avoided.

    A sampler may offer `tokens_and_images(labels, seeds)`; otherwise, when `decode` is given
    and the sampler is the plain teacher (images = decode(tokens)), tokens are decoded directly;
    otherwise both methods are called (DD students decode continuous vectors, so their images
    are not decode(tokens)).
    """
    both = getattr(sampler, "tokens_and_images", None)
    if callable(both):
        return both(labels, seeds)
    from ddcore.samplers.base import TeacherSampler

    tokens = sampler.tokens(labels, seeds)
    if decode is not None and type(sampler) is TeacherSampler:
        return tokens, decode(tokens)
    return tokens, sampler.images(labels, seeds)


@torch.no_grad()
def run_sampler(
    sampler,
    extractor: FeatureExtractorBase,
    labels: Tensor,
    seeds: Sequence[int],
    batch_size: int,
    keep_tokens: bool = True,
    decode=None,
    image_size: int | None = None,
    progress: bool = True,
) -> SamplerRun:
    """Generate images for (labels, seeds) in batches and keep only their features and tokens."""
    feats, logits, toks = [], [], []
    seconds = 0.0
    n = len(seeds)
    with tqdm(
        total=n, desc=getattr(sampler, "name", "sampler"), unit="img", disable=not progress, mininterval=2.0
    ) as bar:
        for i in range(0, n, batch_size):
            lab, sd = labels[i : i + batch_size], list(seeds[i : i + batch_size])
            _sync()
            t0 = time.perf_counter()
            if keep_tokens:
                tok, img = sample_tokens_and_images(sampler, lab, sd, decode)
                toks.append(tok.cpu())
            else:
                img = sampler.images(lab, sd)
            _sync()
            seconds += time.perf_counter() - t0
            f, z = extract(extractor, to_uint8(img, image_size))
            feats.append(f)
            logits.append(z)
            bar.update(len(sd))
    return SamplerRun(torch.cat(feats), torch.cat(logits), torch.cat(toks) if toks else None, seconds)


# --------------------------------------------------------------------------------------------
# reference statistics
# --------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """What generated samples are compared with.

    `mu`/`sigma` are used for FID; `features` (when available) for precision/recall and KID.
    A stats-only reference (e.g. precomputed ImageNet mu/sigma) gives FID only.
    """

    name: str
    kind: str  # "world", "images", "folder", "npz-stats", "npz-images", "npz-stats+images", "pth-stats"
    extractor: str
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: Tensor | None = None
    meta: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "extractor": self.extractor, "n": self.n, **self.meta}


def reference_from_features(features: Tensor, name: str, kind: str, extractor: str, **meta) -> Reference:
    mu, sigma = feature_stats(features)
    return Reference(name, kind, extractor, mu, sigma, features.shape[0], features.float().cpu(), meta)


def reference_from_images(
    images: Tensor | np.ndarray,
    extractor: FeatureExtractorBase,
    name: str,
    kind: str = "images",
    batch_size: int = 250,
    nhwc: bool = False,
    **meta,
) -> Reference:
    """Reference from uint8 images, NCHW by default (NHWC, as stored in npz files, with nhwc=True)."""
    total = images.shape[0]
    feats, _ = extract_batches(extractor, _chunks(images, batch_size, nhwc), total, desc=f"reference {name}")
    return reference_from_features(feats, name, kind, extractor.get_name(), **meta)


def tiny_world_reference(
    extractor: FeatureExtractorBase,
    n: int,
    image_size: int = 32,
    num_classes: int = 10,
    seed: int = 0,
    batch_size: int = 250,
) -> Reference:
    """Real tiny-world images from `make_dataset` with a seed the world's training data never uses."""
    from ddcore.tiny.data import make_dataset

    ref_seed = reference_seed(seed)
    images, _ = make_dataset(n, image_size, num_classes, seed=ref_seed)
    return reference_from_images(
        images, extractor, "world", kind="world", batch_size=batch_size, nhwc=True, seed=ref_seed
    )


def reference_seed(world_seed: int) -> int:
    """Held-out data seed for the tiny-world reference set (training uses world_seed itself)."""
    return world_seed + 104_729


def reference_from_folder(
    path: str | Path, extractor: FeatureExtractorBase, batch_size: int = 250, exts=(".png", ".jpg", ".jpeg")
) -> Reference:
    """All images under `path` (sorted, recursive), read as RGB uint8; they must share one size."""
    from PIL import Image

    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in exts)
    if not files:
        raise EvaluationUnavailable(f"no images ({', '.join(exts)}) found under {path}")

    def batches() -> Iterator[Tensor]:
        for i in range(0, len(files), batch_size):
            arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[i : i + batch_size]])
            yield nhwc_to_nchw(arr)

    feats, _ = extract_batches(extractor, batches(), len(files), desc=f"reference {Path(path).name}")
    return reference_from_features(feats, str(path), "folder", extractor.get_name())


def load_reference(
    path: str | Path, extractor: FeatureExtractorBase, batch_size: int = 250, use_images: bool = True
) -> Reference:
    """Reference from a file or folder.

    * `.npz` with `mu`/`sigma` (ADM's VIRTUAL_imagenet256_labeled.npz, or `save_reference_stats`):
      those statistics give FID, as the ADM evaluator uses them;
    * `.npz` with `arr_0` uint8 (N, H, W, 3) images: features are extracted (with `mu`/`sigma`
      also present, the stored statistics still define FID and the images add precision/recall/KID);
    * `.pth`/`.pt` with `m`/`s` or `mu`/`sigma` (DD1's statistic.pth), read with weights_only;
    * a folder of images.
    """
    path = Path(path)
    if path.is_dir():
        return reference_from_folder(path, extractor, batch_size)
    if not path.is_file():
        raise EvaluationUnavailable(
            f"reference {path} does not exist; for ImageNet download ADM's VIRTUAL_imagenet256_labeled.npz "
            "(mu/sigma + arr_0 images) and set eval.reference to its path"
        )
    name = extractor.get_name()
    if path.suffix in (".pth", ".pt"):
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise EvaluationUnavailable(
                f"{path}: cannot read statistics with weights_only=True ({err})"
            ) from None
        mu, sigma = (
            (d.get("mu", d.get("m")), d.get("sigma", d.get("s"))) if isinstance(d, dict) else (None, None)
        )
        if mu is None or sigma is None:
            raise EvaluationUnavailable(f"{path}: expected keys 'mu'/'sigma' or 'm'/'s'")
        mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
        return Reference(str(path), "pth-stats", name, mu, sigma, -1, None)
    with np.load(path) as z:
        keys = set(z.files)
        stats = ("mu" in keys and "sigma" in keys) and (
            np.asarray(z["mu"], np.float64),
            np.asarray(z["sigma"], np.float64),
        )
        n_stats = int(z["n"]) if "n" in keys else -1
        images = z["arr_0"] if use_images and "arr_0" in keys else None
    if images is None and not stats:
        raise EvaluationUnavailable(
            f"{path}: needs 'mu'+'sigma' statistics or 'arr_0' uint8 images, has {sorted(keys)}"
        )
    if images is None:
        return Reference(str(path), "npz-stats", name, stats[0], stats[1], n_stats, None)
    ref = reference_from_images(
        images, extractor, str(path), kind="npz-images", batch_size=batch_size, nhwc=True
    )
    if stats:
        ref.mu, ref.sigma, ref.kind = stats[0], stats[1], "npz-stats+images"
    if ref.mu.shape[0] != ref.features.shape[1]:
        raise EvaluationUnavailable(
            f"{path}: statistics are {ref.mu.shape[0]}-d but {name} gives {ref.features.shape[1]}-d features"
        )
    return ref


def save_reference_stats(ref: Reference, path: str | Path) -> Path:
    """Cache a reference as an npz of mu/sigma (and n), loadable by `load_reference`."""
    from ddcore.checkpoints import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=ref.mu, sigma=ref.sigma, n=np.int64(ref.n))
    return Path(path)
