"""The tiny world with a VAR teacher: a small multi-scale VQVAE and a small VAR trained offline.

Same procedural data as the LlamaGen tiny world (`ddcore.tiny.data`), same judge network
(`ddcore.tiny.evaluator`), but the teacher is next-scale: 32 x 32 images, a 4x-downsampling VQVAE
(ch_mult (1, 2, 2)) to an 8 x 8 latent, pyramid (1, 2, 3, 4, 6, 8) = 130 tokens in 6 AR steps.

Training follows the original recipe at small scale:
  * VQVAE: MSE reconstruction + the multi-scale VQ loss (`VQVAE.forward`); no perceptual or GAN
    loss (the tiny images are flat colour fields). The codebook starts from latent vectors of
    the data and unused codes are restarted from current residuals, which a small residual VQ
    needs to use more than a handful of codes;
  * VAR: cross-entropy over all 130 positions with teacher forcing, labels dropped to the null class
    with `class_dropout_prob` (for CFG), AdamW with warmup + cosine, the original's init (AdaLN gammas
    near zero, small head).

Built part by part with `ddcore.tiny.builder` (resumable, as the LlamaGen world). Artefacts in
`out/`: `vqvae.{safetensors,json}`, `var.{safetensors,json}` (plain configs, loadable with
`ddcore.teachers.var.build_var_teacher_from_dir`; their hashes in `vqvae.part.json` and
`var.part.json`), `tokens.{safetensors,json}`, `evaluator.{safetensors,json}`, `quality.json`,
`samples.png`, `reconstructions.png` and `var_world.json` (the report).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddcore.checkpoints import load_state_dict_file, save_model
from ddcore.models.var import VAR, VARConfig
from ddcore.models.var_vqvae import VQVAE, VQVAEConfig
from ddcore.params import SamplingParams, TinyWorldParams
from ddcore.teachers.var.catalogue import suggest_var
from ddcore.teachers.var.teacher import VARTeacher, build_var_teacher_from_dir
from ddcore.tiny.builder import (
    WorldBuilder,
    evaluator_part,
    judge_reconstructions,
    load_config_model,
    part_hash,
    save_reconstruction_grid,
    save_sample_grid,
    world_fields,
)
from ddcore.tiny.data import make_dataset_with_attributes, to_model_range
from ddcore.tiny.evaluator import SAMPLE_SEED_BASE, TinyEvaluator, accuracy_per_class, load_evaluator
from ddcore.tiny.training import optimise, random_batch, seeded, step_bar, warmup_cosine

TINY_VAR_PATCH_NUMS = (1, 2, 3, 4, 6, 8)
REPORT_FILE = "var_world.json"
# sampling used for the quality check (the weight ramps from 1 to this value over the scales)
CHECK_SAMPLING = SamplingParams(cfg_scale=2.5)
VAL_IMAGES = 1000  # held out: min(this, train_images // 10) images, generated before the training set
# The VAR world's judge has always trained at train_evaluator's default LR, not at the world's
# evaluator_lr (kept: its weights must not change); evaluator_lr is not among its hash inputs.
JUDGE_LR = 2e-3
# Bump a version when the code of that part changes what it produces (see stage hashes).
CODE_VERSIONS = {"data": 1, "evaluator": 1, "vqvae": 1, "tokens": 1, "var": 1, "quality": 1}
LOAD = {"drop_patterns": (), "suggest": suggest_var}  # strict loading, as build_var_teacher_from_dir


def tiny_var_configs(world: TinyWorldParams) -> tuple[VQVAEConfig, VARConfig]:
    """The VQVAE / VAR architectures a tiny world's parameters describe."""
    down = 2 ** (len(world.vq_ch_mult) - 1)
    latent = world.image_size // down
    if latent * down != world.image_size:
        raise ValueError(f"image_size {world.image_size} is not divisible by the VQVAE downsampling {down}")
    patch_nums = tuple(p for p in TINY_VAR_PATCH_NUMS if p < latent) + (latent,)
    vq = VQVAEConfig(
        vocab_size=world.vq_codebook_size,
        Cvae=world.vq_codebook_dim,
        ch=world.vq_ch,
        ch_mult=tuple(world.vq_ch_mult),
        num_res_blocks=1,
        patch_nums=patch_nums,
        norm_groups=math.gcd(32, world.vq_ch),
    )
    var = VARConfig(
        depth=world.gpt_layers,
        embed_dim=world.gpt_dim,
        num_heads=world.gpt_heads,
        patch_nums=patch_nums,
        vocab_size=world.vq_codebook_size,
        Cvae=world.vq_codebook_dim,
        num_classes=world.num_classes,
        cond_drop_rate=world.class_dropout_prob,
    )
    return vq, var


# --------------------------------------------------------------------------------------------
# VQVAE
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _restart_codes(vq: VQVAE, x: Tensor, dead: Tensor, g: torch.Generator) -> int:
    """Re-initialise the codes in `dead` (bool (V,)) from latent vectors of the batch `x`."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0
    f = vq.img_to_f(x).float()
    vecs = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    pick = torch.randint(0, vecs.shape[0], (n_dead,), generator=g).to(vecs.device)
    noise = torch.randn(n_dead, vecs.shape[1], generator=g).to(vecs.device) * vecs.std() * 0.1
    vq.quantize.embedding.weight[dead] = vecs[pick] + noise
    return n_dead


@torch.no_grad()
def _record_hits(vq: VQVAE, idx: list[Tensor], decay: float = 0.9) -> None:
    """ema_vocab_hit_SV: per-scale EMA of code hits (the original's usage statistic)."""
    hits = vq.quantize.ema_vocab_hit_SV
    for si, i in enumerate(idx):
        h = torch.bincount(i.flatten(), minlength=hits.shape[1]).float()
        hits[si].mul_(decay).add_(h, alpha=1 - decay)


def train_var_vqvae(
    images: Tensor,
    cfg: VQVAEConfig,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    restart_every: int = 100,
    progress: bool = True,
) -> tuple[VQVAE, dict]:
    """Train on images in [-1, 1] (N, 3, H, W); returns the VQVAE in eval mode and its last losses."""
    g = seeded(seed)
    vq = VQVAE(cfg).to(device)
    with torch.no_grad():  # start the codebook on the data, at the latent's scale
        _restart_codes(vq, images[:batch_size].to(device), torch.ones(cfg.vocab_size, dtype=torch.bool), g)
    opt = torch.optim.AdamW(vq.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
    sched = warmup_cosine(opt, steps, max_warmup=50)
    vq.train()
    last = {}
    bar = step_bar(steps, "var-vqvae", progress)
    for step in bar:
        x = images[random_batch(images.shape[0], batch_size, g)].to(device)
        rec, vq_loss, idx = vq(x)
        rec_loss = F.mse_loss(rec, x)
        optimise(opt, sched, rec_loss + vq_loss)
        _record_hits(vq, idx)
        if restart_every and (step + 1) % restart_every == 0 and step + 1 < steps * 0.8:
            dead = vq.quantize.ema_vocab_hit_SV.sum(0) < 1e-3
            _restart_codes(vq, x, dead, g)
        last = {"rec_mse": rec_loss.item(), "vq_loss": vq_loss.item()}
        bar.set_postfix(rec=f"{last['rec_mse']:.4f}", vq=f"{last['vq_loss']:.4f}", refresh=False)
    vq.eval().requires_grad_(False)
    return vq, last


@torch.no_grad()
def encode_images(vq: VQVAE, images: Tensor, batch_size: int = 256) -> Tensor:
    """Images in [-1, 1] -> flat token pyramids (N, L)."""
    dev = vq.codebook.device
    out = [
        torch.cat(vq.img_to_idx_pyramid(images[i : i + batch_size].to(dev)), 1).cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def reconstruct(vq: VQVAE, images: Tensor, batch_size: int = 256) -> Tensor:
    """Images in [-1, 1] through the token pyramid and back (on the CPU, in [-1, 1])."""
    dev = vq.codebook.device
    out = [
        vq.idx_pyramid_to_img(vq.img_to_idx_pyramid(images[i : i + batch_size].to(dev))).cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# VAR
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def init_var_weights(
    var: VAR, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02
) -> None:
    """The original's initialisation: truncated-normal linears and embeddings (std sqrt(1/(3C))),
    residual projections scaled by 1/sqrt(2 depth), AdaLN gammas near zero (blocks start close to
    the identity) and a small head."""
    c, depth = var.cfg.embed_dim, var.cfg.depth
    std = math.sqrt(1 / c / 3)
    for m in var.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)
    var.head.weight.mul_(init_head)
    var.head_nm.ada_lin[-1].weight.mul_(init_adaln)
    for block in var.blocks:
        block.attn.proj.weight.div_(math.sqrt(2 * depth))
        block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
        if not var.cfg.shared_aln:
            w = block.ada_lin[-1].weight
            w[2 * c :].mul_(init_adaln)
            w[: 2 * c].mul_(init_adaln_gamma)


def train_var(
    tokens: Tensor,
    labels: Tensor,
    vq: VQVAE,
    cfg: VARConfig,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[VAR, dict]:
    """Teacher-forced next-scale training on flat token pyramids (N, L); returns VAR in eval mode."""
    g = seeded(seed)
    var = VAR(cfg)
    init_var_weights(var)
    var.to(device)
    decay, no_decay = [], []
    for name, p in var.named_parameters():
        (
            no_decay if p.ndim < 2 or "pos_" in name or "embed" in name or "class_emb" in name else decay
        ).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    sched = warmup_cosine(opt, steps, max_warmup=100)
    var.train()
    last = {}
    bar = step_bar(steps, "var", progress)
    for _ in bar:
        pick = random_batch(tokens.shape[0], batch_size, g)
        tok, lab = tokens[pick].to(device), labels[pick].to(device)
        with torch.no_grad():
            x_in = vq.idx_to_var_input(tok)
        logits = var(lab, x_in, drop_labels=True)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok.reshape(-1))
        optimise(opt, sched, loss, clip=2.0, params=var.parameters())
        last = {"ce": loss.item()}
        bar.set_postfix(ce=f"{last['ce']:.3f}", refresh=False)
    var.eval().requires_grad_(False)
    return var, last


@torch.no_grad()
def token_nll(teacher: VARTeacher, tokens: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Mean per-token NLL (nats) of the conditional model on held-out token pyramids."""
    total, dev = 0.0, teacher.device
    for i in range(0, tokens.shape[0], batch_size):
        tok, lab = tokens[i : i + batch_size].to(dev), labels[i : i + batch_size].to(dev)
        logits = teacher.teacher_forced_logits(tok, lab, SamplingParams(cfg_scale=1.0))
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tok.reshape(-1), reduction="sum"
        ).item()
    return total / tokens.numel()


@torch.no_grad()
def sample_images(
    teacher: VARTeacher, n: int, params: SamplingParams = CHECK_SAMPLING, seed: int = 0, batch_size: int = 250
) -> tuple[Tensor, Tensor]:
    """n teacher samples (balanced labels, seeds seed..seed+n-1) as images in [0, 1] and labels."""
    labels = torch.arange(n) % teacher.num_classes
    imgs = []
    for i in range(0, n, batch_size):
        lab = labels[i : i + batch_size]
        seeds = list(range(seed + i, seed + i + lab.shape[0]))
        imgs.append(teacher.decode(teacher.sample(lab, seeds, params)).cpu())
    return torch.cat(imgs), labels


# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------


def var_stage_hashes(
    world: TinyWorldParams,
    sampling: SamplingParams | None = None,
    val_images: int = VAL_IMAGES,
    check_samples: int | None = None,
) -> dict[str, str]:
    """The dependency hash of every part of the VAR world (chained, as the LlamaGen world's)."""
    v, w = CODE_VERSIONS, world
    n_val, check_samples = _split_sizes(w, val_images, check_samples)
    fields = world_fields(w, keys=("image_size", "num_classes", "train_images", "seed"))
    data = part_hash(v["data"], fields, val_images=n_val)
    judge = world_fields(w, keys=("evaluator_steps", "evaluator_batch_size"))
    evaluator = part_hash(v["evaluator"], judge, data=data, lr=JUDGE_LR)
    vqvae = part_hash(v["vqvae"], world_fields(w, "vq_"), data=data)
    tokens = part_hash(v["tokens"], vqvae=vqvae)
    var = part_hash(v["var"], world_fields(w, "gpt_", keys=("class_dropout_prob",)), tokens=tokens)
    quality = part_hash(
        v["quality"],
        parts=[evaluator, vqvae, tokens, var],
        sampling=(sampling or CHECK_SAMPLING).model_dump(),
        num_samples=check_samples,
    )
    return dict(data=data, evaluator=evaluator, vqvae=vqvae, tokens=tokens, var=var, quality=quality)


def _split_sizes(world: TinyWorldParams, val_images: int, check_samples: int | None) -> tuple[int, int]:
    """(held-out images, quality-check samples) for a world."""
    n_val = min(val_images, max(1, world.train_images // 10))
    return n_val, check_samples or world.quality_samples_per_class * world.num_classes


class _Data(NamedTuple):
    """The procedural images, uint8 for the judge and split in [-1, 1] for the VQVAE / VAR."""

    images: np.ndarray  # uint8 (N, H, W, 3): the first n_val are held out
    labels: np.ndarray
    attrs: np.ndarray
    x_tr: Tensor  # training images in [-1, 1]
    y_tr: Tensor
    x_val: Tensor  # held-out images in [-1, 1]
    y_val: Tensor


def _data(world: TinyWorldParams, n_val: int) -> _Data:
    """One seeded draw of n_val + train_images images; the first n_val are the held-out ones."""
    images, labels, attrs = make_dataset_with_attributes(
        world.train_images + n_val, world.image_size, world.num_classes, world.seed
    )
    x_all, y_all = to_model_range(images), torch.as_tensor(labels)
    return _Data(images, labels, attrs, x_all[n_val:], y_all[n_val:], x_all[:n_val], y_all[:n_val])


def prepare_tiny_var_world(
    world: TinyWorldParams,
    out: str | Path,
    progress: bool = True,
    device: str | torch.device = "cpu",
    val_images: int = VAL_IMAGES,
    check_samples: int | None = None,
    sampling: SamplingParams | None = None,
) -> dict:
    """Build (or resume) the VQVAE, its tokens, the VAR and the judge in `out`, part by part as
    the LlamaGen world (`ddcore.tiny.builder`); write the quality report and return it.

    The quality check follows the LlamaGen world's: `check_samples` teacher samples (default
    `quality_samples_per_class` per class) from the quality seeds, drawn with `sampling` (the
    preset's teacher settings; default CHECK_SAMPLING), and the judge's accuracy on held-out
    reconstructions relative to real images; the report records the preset's gates, the parts'
    hashes, which parts were reused, and the build times."""
    check_sampling = sampling or CHECK_SAMPLING
    n_val, check_samples = _split_sizes(world, val_images, check_samples)
    out = Path(out)
    vq_cfg, var_cfg = tiny_var_configs(world)
    hashes = var_stage_hashes(world, check_sampling, val_images, check_samples)
    with WorldBuilder(out, hashes) as b:
        d = b.step("data", lambda: _data(world, n_val))

        def build_vqvae() -> tuple[VQVAE, dict]:
            vq, last = train_var_vqvae(
                d.x_tr, vq_cfg, world.vq_steps, world.vq_batch_size, world.vq_lr, world.seed, device,
                progress=progress,
            )  # fmt: skip
            return vq, {"stats": last}

        vq = b.part(
            "vqvae",
            lambda meta: load_config_model(
                out / "vqvae", lambda c: VQVAE(VQVAEConfig.from_dict(c)), device, **LOAD
            ),
            build_vqvae,
            lambda vq, meta: save_model(out / "vqvae", vq, vq.cfg.to_dict()),
            sidecar=True,
        )

        def build_tokens() -> tuple[tuple[Tensor, Tensor], dict]:
            tok_tr, tok_val = encode_images(vq, d.x_tr), encode_images(vq, d.x_val)
            used = int((torch.bincount(tok_tr.flatten(), minlength=vq_cfg.vocab_size) > 0).sum())
            return (tok_tr, tok_val), {"shape": list(tok_tr.shape), "codes_used": used}

        def load_tokens(meta: dict) -> tuple[Tensor, Tensor]:
            sd = load_state_dict_file(out / "tokens.safetensors")
            return sd["train"].long(), sd["val"].long()

        def save_tokens(toks: tuple[Tensor, Tensor], meta: dict) -> None:
            save_model(
                out / "tokens", {"train": toks[0].to(torch.int32), "val": toks[1].to(torch.int32)}, meta
            )

        tok_tr, tok_val = b.part("tokens", load_tokens, build_tokens, save_tokens)

        def build_var() -> tuple[VAR, dict]:
            var, last = train_var(
                tok_tr, d.y_tr, vq, var_cfg, world.gpt_steps, world.gpt_batch_size, world.gpt_lr, world.seed,
                device, progress,
            )  # fmt: skip
            return var, {"stats": last}

        var = b.part(
            "var",
            lambda meta: load_config_model(
                out / "var", lambda c: VAR(VARConfig.from_dict(c)), device, **LOAD
            ),
            build_var,
            lambda var, meta: save_model(out / "var", var, var.cfg.to_dict()),
            sidecar=True,
        )

        judge_data = d.images[n_val:], d.labels[n_val:], d.attrs[n_val:]
        evaluator = evaluator_part(b, *judge_data, world, seed=world.seed, lr=JUDGE_LR, progress=progress)

        def build_quality() -> dict:
            teacher = VARTeacher(var, vq)
            samples, sample_labels = sample_images(
                teacher, check_samples, check_sampling, seed=SAMPLE_SEED_BASE
            )
            sample_acc, per_class = accuracy_per_class(evaluator, samples, sample_labels)
            recon = reconstruct(vq, d.x_val)
            real01, recon01 = (d.x_val + 1) / 2, ((recon + 1) / 2).clamp(0, 1)
            judged = judge_reconstructions(evaluator, real01, recon01, d.y_val)
            result = {
                **judged,
                "val_rec_mse": F.mse_loss(recon, d.x_val.cpu()).item(),
                "val_nll": token_nll(teacher, tok_val, d.y_val),
                "sample_accuracy": sample_acc,
                "sample_accuracy_per_class": per_class,
            }
            per_row = max(1, check_samples // world.num_classes)
            save_sample_grid(out, samples, sample_labels, world.num_classes, per_class=per_row)
            save_reconstruction_grid(out, real01, recon01, d.y_val, world.num_classes)
            return result

        q = b.json_part("quality", build_quality)

    report = {
        "family": "var",
        "patch_nums": list(vq_cfg.patch_nums),
        "vq": {
            **b.metas["vqvae"]["stats"],
            "val_rec_mse": q["val_rec_mse"],
            "recon_accuracy": q["evaluator_accuracy_recon"],
            "recon_accuracy_ratio": q["recon_accuracy_ratio"],
            "codes_used": b.metas["tokens"]["codes_used"],
            "vocab_size": vq_cfg.vocab_size,
        },
        "var": {
            **b.metas["var"]["stats"],
            "val_nll": q["val_nll"],
            "uniform_nll": math.log(vq_cfg.vocab_size),
        },
        "evaluator": {"val_accuracy": q["evaluator_accuracy_real"]},
        "teacher": {
            "sample_accuracy": q["sample_accuracy"],
            "sample_accuracy_per_class": q["sample_accuracy_per_class"],
            "min_accuracy": world.min_sample_accuracy,
            "sampling": check_sampling.model_dump(),
            "num_samples": check_samples,
        },
        **b.summary(),
    }
    b.write_report(REPORT_FILE, report)
    return report


def check_var_quality(
    report: dict,
    world: TinyWorldParams | None = None,
    max_nll_fraction: float = 0.8,
) -> list[str]:
    """Problems that make the world useless as a teacher (empty list = fine).

    Gates, as for the LlamaGen world: the world's `min_evaluator_accuracy`, `min_recon_ratio` (the
    judge's accuracy on held-out reconstructions over real images) and `min_sample_accuracy`
    (without `world`: 0.9, 0.95 and the sample gate the report records). The NLL sanity check
    applies unless the world switches its reconstruction gate off (`min_recon_ratio: 0`, the
    test-scale worlds)."""
    min_eval = 0.9 if world is None else world.min_evaluator_accuracy
    min_ratio = 0.95 if world is None else world.min_recon_ratio
    min_acc = report["teacher"].get("min_accuracy", 0.5) if world is None else world.min_sample_accuracy
    problems = []
    ratio = report["vq"].get("recon_accuracy_ratio")
    if min_ratio > 0 and ratio is None:
        problems.append("judge accuracy on VQVAE reconstructions: no measurement (vq.recon_accuracy_ratio)")
    elif min_ratio > 0 and ratio < min_ratio:
        problems.append(
            f"judge accuracy on VQVAE reconstructions / on real images is {ratio:.4f} < {min_ratio}"
        )
    if min_ratio > 0 and report["var"]["val_nll"] >= max_nll_fraction * report["var"]["uniform_nll"]:
        problems.append(
            f"VAR held-out NLL {report['var']['val_nll']:.3f} is near uniform ({report['var']['uniform_nll']:.3f})"
        )
    if report["evaluator"]["val_accuracy"] < min_eval:
        problems.append(f"evaluator accuracy {report['evaluator']['val_accuracy']:.3f} < {min_eval}")
    if report["teacher"]["sample_accuracy"] < min_acc:
        problems.append(
            f"teacher samples are recognised {report['teacher']['sample_accuracy']:.3f} < {min_acc}"
        )
    return problems


def load_tiny_var_world(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[VARTeacher, TinyEvaluator | None]:
    directory = Path(directory)
    teacher = build_var_teacher_from_dir(directory, device=str(device))
    ev_path = directory / "evaluator"
    evaluator = load_evaluator(ev_path, device) if Path(f"{ev_path}.safetensors").is_file() else None
    return teacher, evaluator


def world_summary(report: dict) -> str:
    return (
        f"VAR tiny world: rec MSE {report['vq']['val_rec_mse']:.4f}, codes {report['vq']['codes_used']}/"
        f"{report['vq']['vocab_size']}, NLL {report['var']['val_nll']:.3f} (uniform {report['var']['uniform_nll']:.3f}), "
        f"sample accuracy {report['teacher']['sample_accuracy']:.3f}"
    )


@torch.no_grad()
def scale_prefix_accuracy(
    teacher: VARTeacher,
    evaluator: TinyEvaluator,
    world: TinyWorldParams,
    sampling: SamplingParams,
    n: int = 3000,
    data_seed: int = 424242,
) -> dict[int, tuple[float, dict[str, float]]]:
    """Judge accuracy when the first k scales come from real images and the teacher samples the rest.

    For k = 0..S (k = S: plain reconstructions). Shows at which scale a class is decided: if the
    accuracy stays low even with every scale but the last given, the class is lost in the last
    scale's independent per-token sampling. Images from a data seed no training set uses."""
    images, labels, _ = make_dataset_with_attributes(n, world.image_size, world.num_classes, data_seed)
    labels = torch.as_tensor(labels)
    tokens = encode_images(teacher.vqvae, to_model_range(images))
    noise = teacher.noise(list(range(SAMPLE_SEED_BASE, SAMPLE_SEED_BASE + n)))
    bounds = [*teacher.step_starts, teacher.seq_len]
    out = {}
    for k in range(len(bounds)):
        prefix = tokens[:, : bounds[k]] if bounds[k] else None
        sampled = teacher.generate(labels, sampling, noise, prefix=prefix)
        out[k] = accuracy_per_class(evaluator.cpu(), teacher.decode(sampled).cpu(), labels)
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m ddcore.teachers.var.tiny_world probe --world DIR --preset tiny-var`: scale_prefix_accuracy."""
    import argparse

    from ddcore.params import load_preset

    ap = argparse.ArgumentParser(prog="python -m ddcore.teachers.var.tiny_world")
    ap.add_argument("command", choices=["probe"])
    ap.add_argument("--world", required=True, help="a prepared VAR tiny-world directory")
    ap.add_argument("--preset", default="tiny-var", help="preset whose world and sampling to use")
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args(argv)
    preset = load_preset(args.preset)
    teacher, evaluator = load_tiny_var_world(args.world)
    starts = [*teacher.step_starts, teacher.seq_len]
    res = scale_prefix_accuracy(teacher, evaluator, preset.teacher.world, preset.teacher.sampling, args.n)
    for k, (acc, per) in res.items():
        worst = ", ".join(f"{c} {a:.2f}" for c, a in sorted(per.items(), key=lambda kv: kv[1])[:3])
        print(f"real scales 1..{k} ({starts[k]} tokens) + sampled rest: accuracy {acc:.3f}; lowest: {worst}")


__all__ = [
    "check_var_quality",
    "encode_images",
    "init_var_weights",
    "load_tiny_var_world",
    "main",
    "prepare_tiny_var_world",
    "reconstruct",
    "sample_images",
    "scale_prefix_accuracy",
    "tiny_var_configs",
    "token_nll",
    "train_var",
    "train_var_vqvae",
    "var_stage_hashes",
    "world_summary",
]


if __name__ == "__main__":
    main()
