"""Adam (Kingma & Ba 2015) with the recipe's β1 = 0, β2 = 0.999, ε = 1e-8 and explicit state.

The update is the one ``torch.optim.Adam`` makes (bias-corrected, ``ε`` added after the square root)::

    m ← β1 m + (1 − β1) g        v ← β2 v + (1 − β2) g²
    p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)

``update_clip`` (not in the recipe; docs/training.md) bounds each element's step to ``update_clip × lr``: the
update ``m̂ / (√v̂ + ε)`` is clamped to ``[−update_clip, update_clip]`` before it is scaled by the lr. At β1 = 0 an
element whose gradient jumps far above its running RMS otherwise moves by up to ``√((1 − β2ᵗ)/(1 − β2)) × lr``.

It runs torch's fused single-pass kernel (the one behind ``torch.optim.Adam(fused=True)``) where torch has
it, and the same formula op by op otherwise. The state is a flat ``dict[str, Tensor]`` so it can be
checkpointed to safetensors and restored bit for bit.
"""

from __future__ import annotations

import math

import torch

_FUSED = hasattr(torch, "_fused_adam_")


class Adam:
    """Adam over named tensors, updated in place; gradients are passed to :meth:`step` by name."""

    def __init__(self, params: dict[str, torch.Tensor], *, beta1: float = 0.0, beta2: float = 0.999,
                 eps: float = 1e-8, fused: bool | None = None, lr_scale: dict[str, float] | None = None,
                 update_clip: float | None = None):
        if update_clip is not None and not update_clip > 0:
            raise ValueError(f"update_clip must be positive (or None), got {update_clip}")
        self.params = params
        self.update_clip = update_clip
        # per-parameter multipliers of the step's lr (torch's parameter groups): {name: factor}, default 1
        self.lr_scale = {name: float((lr_scale or {}).get(name, 1.0)) for name in params}
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        # the fused kernel has no clamp: a clipped update runs op by op
        self.fused = (_FUSED if fused is None else (fused and _FUSED)) and update_clip is None
        self.t = 0
        self.exp_avg = {name: torch.zeros_like(p) for name, p in params.items()}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p in params.items()}
        # the fused kernel wants its step counters on the parameters' device (a CPU counter fails on CUDA)
        self._steps = {name: torch.zeros((), dtype=torch.float32, device=p.device) for name, p in params.items()}

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], lr: float) -> None:
        self.t += 1
        if self.fused:
            names = list(self.params)
            for name in names:
                self._steps[name].fill_(self.t)
            # one call per (dtype, lr) group (the fused kernel wants matching dtypes and one lr per call)
            groups: dict[tuple[torch.dtype, float], list[str]] = {}
            for name in names:
                groups.setdefault((self.params[name].dtype, self.lr_scale[name]), []).append(name)
            for (_, scale), group in groups.items():
                torch._fused_adam_(
                    [self.params[n] for n in group], [grads[n].contiguous() for n in group],
                    [self.exp_avg[n] for n in group], [self.exp_avg_sq[n] for n in group], [],
                    [self._steps[n] for n in group], lr=lr * scale, beta1=self.beta1, beta2=self.beta2,
                    weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False)
            return
        bias1 = 1.0 - self.beta1 ** self.t
        bias2_sqrt = math.sqrt(1.0 - self.beta2 ** self.t)
        for name, p in self.params.items():
            g = grads[name]
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            v.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
            m.mul_(self.beta1).add_(g, alpha=1.0 - self.beta1)
            denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
            if self.update_clip is None:
                p.addcdiv_(m, denom, value=-lr * self.lr_scale[name] / bias1)
            else:
                update = torch.div(m, denom, out=denom)       # the same division, in denom's buffer
                update.clamp_(-self.update_clip * bias1, self.update_clip * bias1)
                p.add_(update, alpha=-lr * self.lr_scale[name] / bias1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"exp_avg_sq.{k}": v for k, v in self.exp_avg_sq.items()}
        out.update({f"exp_avg.{k}": v for k, v in self.exp_avg.items()})
        out["t"] = torch.tensor([self.t], dtype=torch.int64)
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.t = int(tensors["t"][0])
        for k in self.params:
            self.exp_avg_sq[k].copy_(tensors[f"exp_avg_sq.{k}"])
            self.exp_avg[k].copy_(tensors[f"exp_avg.{k}"])
