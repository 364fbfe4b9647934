"""Multi-task gradient calibration (FULLER, ``stage.grad_calibration: fuller``): the gradients that each task's loss
sends into the shared LLM are calibrated where they enter it, and balanced again before they leave it.

FULLER (Huang et al., ICCV 2023) trains several task heads on one multi-modal backbone. Its two levels, as they map
onto this model:

- **Task level, at the backbone's last layer.** Each task ``t`` (the LM loss, each expert's weighted terms, each
  auxiliary loss) has a gradient ``g_t = ∂L_t/∂h`` on the LLM's last hidden states ``h`` (``(B, L, H)``, every
  forward of the micro-batch). Conflicting components are removed (a PCGrad projection: where ``g_i·g_j < 0``,
  ``g_i`` loses its component along ``g_j``) and the magnitudes are balanced (every task's calibrated gradient is
  rescaled to the mean norm of the tasks' gradients): :func:`calibrate`. Only the calibrated sum goes on into
  the LLM. A task whose loss does not read ``h`` (an auxiliary loss on an earlier layer) has no gradient there and
  keeps its own path; every task keeps its gradient into its own head (paths that do not pass through ``h``).
  The stage's loss weights act before the balance, so at ``h`` they only decide which tasks take part (weight 0:
  none); they still scale the heads' own gradients.
- **Modality level, at the LLM's input embeddings.** The gradient reaching the visual-token positions (towards
  the projector and the vision tower) and the one reaching every other position (the text side: token
  embeddings, task queries) are rescaled to the mean of their two norms: :func:`balance_modalities`, a hook on
  the input-embedding tensor of one forward.

:func:`calibrated_loss` turns this into one scalar for the engine's own ``backward`` (see there).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

#: the stage option's values (``stage.grad_calibration``)
GRAD_CALIBRATIONS = ("none", "fuller")


def project_conflicts(grads: torch.Tensor) -> torch.Tensor:
    """PCGrad's projection: each task's gradient loses its component along every other task's original gradient
    it conflicts with (negative inner product), in task order (deterministic, not PCGrad's random order).

    Args:
        grads: ``(T, D)`` one flattened gradient per task.

    Returns:
        ``(T, D)`` the projected gradients; a task without conflict keeps its gradient exactly.
    """
    out = grads.clone()
    sq = (grads * grads).sum(1).clamp_min(torch.finfo(grads.dtype).tiny)  # (T,)
    for i in range(len(grads)):
        for j in range(len(grads)):
            if i != j:  # (a zero gradient has dot 0: nothing is removed; no branch reads the device)
                dot = out[i] @ grads[j]
                out[i] = out[i] - torch.where(dot < 0, dot / sq[j], torch.zeros_like(dot)) * grads[j]
    return out


def balance_magnitudes(grads: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Rescale every nonzero row of ``grads`` (``(T, D)``) to the mean norm of the nonzero rows of ``reference``
    (``(T, D)``, the gradients before projection); zero rows stay zero."""
    norms = grads.norm(dim=1)
    ref = reference.norm(dim=1)
    alive = (ref > 0).to(ref.dtype)
    target = (ref * alive).sum() / alive.sum().clamp_min(1)
    scale = torch.where(norms > 0, target / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))
    return grads * scale[:, None]


def calibrate(grads: torch.Tensor) -> torch.Tensor:
    """FULLER's task-level calibration of ``(T, D)`` task gradients: project out conflicts, balance magnitudes,
    sum. Returns ``(D,)``."""
    return balance_magnitudes(project_conflicts(grads), grads).sum(0)


def balance_modalities(grad: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """FULLER's modality-level calibration of the gradient on the LLM's input embeddings.

    Args:
        grad: ``(B, L, H)`` gradient on the input embeddings.
        visual: ``(B, L)`` bool, True at visual-token positions (on ``grad``'s device).

    Returns:
        ``(B, L, H)``: the visual and the other positions each rescaled to the mean of the two parts' norms
        (``grad`` unchanged when either part is zero).
    """
    mask = visual.unsqueeze(-1).to(torch.float32)
    g = grad.float()
    nv, nt = (g * mask).norm(), (g * (1 - mask)).norm()
    both = (nv > 0) & (nt > 0)  # a side without gradient: nothing to balance (no branch reads the device)
    target = (nv + nt) / 2
    sv = torch.where(both, target / nv.clamp_min(1e-30), torch.ones_like(nv))
    st = torch.where(both, target / nt.clamp_min(1e-30), torch.ones_like(nt))
    return (g * (mask * sv + (1 - mask) * st)).to(grad.dtype)


def calibrated_loss(total: torch.Tensor, tasks: Mapping[str, torch.Tensor], shared: Sequence[torch.Tensor]
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A scalar whose value is ``total`` and whose gradient is FULLER's: ``total``'s gradient on every path that
    does not pass through ``shared``, plus the calibrated task gradient through ``shared``.

    ``tasks``: each task's (weighted) loss, ``Σ tasks == total`` up to zero-weight terms; ``shared``: the LLM's
    last hidden states of every forward (``(B, L, H)`` each). Each task's gradient on ``shared`` is one
    ``torch.autograd.grad`` (it runs only the graph between the loss and ``shared``: heads and LM head, and
    accumulates nothing into parameters); the result is
    ``total + Σ h·(g_cal − Σ_t g_t) − (the same, detached)``, whose gradient through ``shared`` is exactly
    ``g_cal`` (the chain rule: everything ``total`` sends through ``h`` is ``Σ_t g_t``).

    This is the engine's own backward, not a replacement: the trainer (plain torch, DDP, DeepSpeed) back-propagates
    this scalar as it would the plain loss — one backward from the loss, through the LLM once, with DDP's bucketed
    all-reduce, ZeRO's partitioning, loss scaling and gradient accumulation unchanged. Under data parallelism each
    rank calibrates its own micro-batch's gradients, which the engine then averages.

    Returns:
        The scalar and the per-task gradient norms at ``shared`` before calibration (0-dim tensors, for the log).
    """
    names = [n for n, v in tasks.items() if v.requires_grad]
    per_task = []
    for name in names:
        grads = torch.autograd.grad(tasks[name], list(shared), retain_graph=True, allow_unused=True,
                                    materialize_grads=True)
        per_task.append(torch.cat([g.reshape(-1).float() for g in grads]))
    if not per_task:
        return total, {}
    stacked = torch.stack(per_task)  # (T, D)
    delta = calibrate(stacked) - stacked.sum(0)
    offset, pieces = 0, []
    for h in shared:
        pieces.append((h * delta[offset: offset + h.numel()].view_as(h).to(h.dtype)).sum())
        offset += h.numel()
    correction = sum(pieces)
    norms = {f"gradnorm_{n}": g.norm().detach() for n, g in zip(names, stacked)}
    return total + correction - correction.detach(), norms
