"""Train the tiny world's class-conditional GPT on the tokenized data set.

The network is LlamaGen's own GPT (ddcore.models.llamagen) with a scaled-down config, so the
tiny teacher runs the published sampling code path: class token, 2D RoPE over the token grid,
KV-cached one-token-per-step decoding, and CFG against the null class (which exists because the
labels are dropped with `class_dropout_prob` during training). Dropouts are 0: with a few
thousand steps on 20k sequences the model underfits rather than overfits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddcore.models.llamagen import GPT, GPTConfig
from ddcore.params import TinyWorldParams
from ddcore.tiny.training import optimise, random_batch, seeded, step_bar, warmup_cosine


def gpt_config_for(world: TinyWorldParams, grid_size: int) -> GPTConfig:
    return GPTConfig(
        dim=world.gpt_dim,
        n_layer=world.gpt_layers,
        n_head=world.gpt_heads,
        n_kv_head=None,
        multiple_of=32,
        ffn_dim_multiplier=None,
        rope_base=10000.0,
        norm_eps=1e-5,
        initializer_range=0.02,
        token_dropout_p=0.0,
        attn_dropout_p=0.0,
        resid_dropout_p=0.0,
        ffn_dropout_p=0.0,
        drop_path_rate=0.0,
        num_classes=world.num_classes,
        class_dropout_prob=world.class_dropout_prob,
        vocab_size=world.vq_codebook_size,
        cls_token_num=1,
        block_size=grid_size * grid_size,
    )


def _param_groups(model: GPT, weight_decay: float) -> list[dict]:
    """No weight decay on norms and embeddings (as is usual for transformers)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_gpt(
    tokens: Tensor,
    labels: Tensor,
    cfg: GPTConfig,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> tuple[GPT, dict]:
    """Train on token sequences (N, block_size) with labels (N,); returns the model (eval) and stats.

    AdamW (betas 0.9/0.95), linear warmup then cosine decay, gradient clipping at 1.0.
    Stats: smoothed final training loss (nats/token) and its perplexity.
    """
    if tokens.shape[1] != cfg.block_size:
        raise ValueError(f"tokens have length {tokens.shape[1]}, the GPT block_size is {cfg.block_size}")
    g = seeded(seed)
    model = GPT(cfg)
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    sched = warmup_cosine(opt, steps, max_warmup=100)
    tokens, labels = tokens.long(), labels.long()
    ema = math.nan
    model.train()
    bar = step_bar(steps, "gpt", progress)
    for _ in bar:
        idx = random_batch(tokens.shape[0], batch_size, g)
        _, loss = model.forward_train(tokens[idx], labels[idx])
        optimise(opt, sched, loss, clip=1.0, params=model.parameters())
        ema = loss.item() if math.isnan(ema) else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
    model.eval()
    return model, {"final_loss": ema, "final_perplexity": math.exp(ema)}


@torch.no_grad()
def mean_nll(model: GPT, tokens: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Mean next-token negative log-likelihood (nats/token) of the conditional model, no dropout."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        t, y = tokens[i : i + batch_size].long(), labels[i : i + batch_size].long()
        logits = model.forward_teacher(t, y)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="sum").item()
        n += t.numel()
    return total / n
