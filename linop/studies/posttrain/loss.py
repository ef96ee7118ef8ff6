"""The FR-PT training loss of seed 001 (§3, Eq. 1-3).

Seed 001 post-trains the modules between layer ``l_S`` and layer ``l_R`` of a converged CNN on

.. math::

    \\mathcal{L}_{cls} = \\mathrm{CrossEntropy}(y^*, \\hat a_L)                    \\quad (1)

    \\mathcal{L}_{rec} = \\mathrm{MSE}(a^*_{l_R}, \\hat a_{l_R})                    \\quad (2)

    \\mathcal{L} = (1 - \\alpha)\\,\\mathcal{L}_{cls} + \\alpha\\,\\mathcal{L}_{rec}  \\quad (3)

where ``a*_{l_R}`` is the label-informed feature map reconstructed from the embedding of
``y*`` (NE by default, seed 001 §3.3) through the frozen layers above ``l_R`` and ``â_{l_R}``
the forward feature map of the module being trained.  The reductions are the torch defaults
the paper's names refer to: ``CrossEntropy`` is averaged over the batch, ``MSE`` over every
element of the batch of feature maps (``torch.nn.MSELoss()``).  The §4.2 ablation replaces
the reconstruction term by ``L1Loss`` for the MA embedding (the L1 optimum), which
:func:`rec_loss_for_embedding` encodes.  Used by :mod:`linop.studies.posttrain`.

Only the paper's fixed-weight formula (Eq. 3) is implemented here; no adaptive weighting.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["REC_LOSSES", "fr_pt_loss", "rec_loss_for_embedding"]

REC_LOSSES = ("mse", "l1")


def rec_loss_for_embedding(embedding: str) -> str:
    """Reconstruction loss seed 001 §4.2 pairs with each output embedding.

    ``"ma"`` (max-assignment, the L1 optimum) -> ``"l1"``; ``"ne"`` (nearest embedding, the
    L2 optimum) and ``"onehot"`` -> ``"mse"``.
    """
    table = {"ne": "mse", "onehot": "mse", "ma": "l1"}
    if embedding not in table:
        raise ValueError(f"embedding={embedding!r}: expected one of {sorted(table)}")
    return table[embedding]


def fr_pt_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    a_hat: torch.Tensor,
    a_star: torch.Tensor,
    alpha: float,
    rec: str = "mse",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FR-PT loss, seed 001 Eq. 3: ``(1 - alpha) * CE(y*, â_L) + alpha * MSE(a*_{l_R}, â_{l_R})``.

    Parameters
    ----------
    logits : (N, classes) tensor
        Network output ``â_L``.
    labels : (N,) int64 tensor
        True labels ``y*``.
    a_hat : (N, ...) tensor
        Forward feature map ``â_{l_R}`` (differentiable w.r.t. the trained modules).
    a_star : (N, ...) tensor
        Reconstructed feature map ``a*_{l_R}`` (a constant target), same shape as ``a_hat``.
    alpha : float in [0, 1]
        Loss coefficient of Eq. 3.
    rec : {"mse", "l1"}
        Reconstruction criterion: MSE (Eq. 2) or L1 (the MA ablation of §4.2); both averaged
        over all elements.

    Returns
    -------
    total, cls, rec_value : scalar tensors
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r}: the loss coefficient of seed 001 Eq. 3 must lie in [0, 1]")
    if rec not in REC_LOSSES:
        raise ValueError(f"rec={rec!r}: expected one of {REC_LOSSES}")
    if a_hat.shape != a_star.shape:
        raise ValueError(f"a_hat shape {tuple(a_hat.shape)} != a_star shape {tuple(a_star.shape)}")
    cls = F.cross_entropy(logits, labels)
    a_star = a_star.to(dtype=a_hat.dtype, device=a_hat.device)
    rec_value = F.mse_loss(a_hat, a_star) if rec == "mse" else F.l1_loss(a_hat, a_star)
    return (1.0 - alpha) * cls + alpha * rec_value, cls, rec_value
