"""The paper's optimisation recipe: AdamW (0.9, 0.95), weight decay 0.02 except on norms, biases and
embeddings, linear warmup then a constant learning rate (optionally decayed to zero at the end:
train.decay_fraction, for short runs), and an EMA of the weights for evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

# parameters that are embeddings (no weight decay), by name
_EMBEDDING_NAMES = ("pos", "special_token", "token_emb.weight")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = any(name == e or name.endswith("." + e) for e in _EMBEDDING_NAMES)
        (no_decay if p.ndim < 2 or is_embedding else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def lr_at(
    step: int, base_lr: float, warmup_steps: int, progress: float = 0.0, decay_fraction: float = 0.0
) -> float:
    """Linear warmup over `warmup_steps`, then constant (the paper's schedule); with
    `decay_fraction` > 0 (warmup-stable-decay), linear decay to zero over the last `decay_fraction`
    of the run, `progress` (0..1) saying how much of it is done: of train.steps, or of
    train.time_limit_min for a time-limited run (train/loop.py)."""
    lr = base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr
    if decay_fraction > 0 and progress > 1.0 - decay_fraction:
        lr *= max(0.0, 1.0 - progress) / decay_fraction
    return lr


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """fp32 exponential moving average of the trainable weights.

    The decay is min(decay, (1 + step) / (10 + step)): the usual warm-up so that short runs (CI, the
    demo) get a useful average; from step ~90K on it equals the paper's 0.9999.
    Under FSDP2 the parameters are DTensor shards and so are the shadows: each process averages only
    its own shard (no communication); checkpoints save them sharded (DCP) and gathered in full.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        params = [_local(p.detach()).float() for p in model.parameters() if p.requires_grad]
        torch._foreach_lerp_([_local(s) for s in self.shadow], params, 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Name -> shadow (DTensor shards under FSDP: gather with full_tensor() for a full export)."""
        return dict(zip(self.names, self.shadow, strict=True))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Full tensors (from safetensors) or tensors already laid out like the shadows."""
        from fluid_cli.train.distributed import to_shards

        for i, n in enumerate(self.names):
            src, dst = state[n], self.shadow[i]
            if type(src) is not type(dst):  # a full tensor into a DTensor shadow: take our shard
                src = to_shards(src, dst)
            dst.copy_(src)  # copy_ moves across devices
