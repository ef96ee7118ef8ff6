"""One post-training run (seed 001 §4): FR-PT or BP-PT of layers ``l_S+1 … l_R``, and the
memory estimate of its training step.

Both methods use the same optimiser, the same initial weights (a copy of the baseline), the
same data order and the same seed; FR-PT minimises seed 001 Eq. 3
(:func:`~linop.studies.posttrain.loss.fr_pt_loss`), BP-PT the cross-entropy alone.

Memory: this runs on CPU, so the paper's "GPU Mem" (``torch.cuda`` peak) is replaced by a
*tensor-accounting estimate* of the training step's peak (:func:`training_memory`): all
parameters + gradients of the trained ones + optimiser state + the batch (+ the batch of
``a*`` targets for FR) + every tensor autograd saves for the backward pass, the last one
*measured* with ``torch.autograd.graph.saved_tensors_hooks`` on one forward pass of a full
batch.  It counts the tensors that must be alive together at the start of the backward pass.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import accuracy_percent, forward_split, model_blocks, set_trainable
from .loss import fr_pt_loss

__all__ = ["METHODS", "OPTIMIZERS", "make_optimizer", "posttrain_run", "training_memory"]

METHODS = ("BP", "FR")
OPTIMIZERS = ("sgd", "adam")
#: optimiser state tensors per trained parameter
_STATE_PER_PARAM = {"adam": 2, "sgd_momentum": 1, "sgd": 0}


def make_optimizer(params: list[nn.Parameter], optimizer: str, lr: float, momentum: float) -> torch.optim.Optimizer:
    """Adam (no weight decay) or SGD (with ``momentum``) over ``params``."""
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer={optimizer!r}: expected one of {OPTIMIZERS}")


def _loss(method: str, logits, yb, a_hat, a_star_b, alpha: float, rec: str) -> torch.Tensor:
    if method == "FR":
        return fr_pt_loss(logits, yb, a_hat, a_star_b, alpha, rec)[0]
    return F.cross_entropy(logits, yb)


def _epoch(model, blocks, opt, method, x_train, y_train, a_star, perm, l_S, l_R, alpha, rec, batch_size) -> float:
    """One pass over the data in the order ``perm``; the mean training loss."""
    model.train()
    total, count = 0.0, 0
    for i in range(0, int(perm.numel()), batch_size):
        idx = perm[i : i + batch_size]
        logits, a_hat = forward_split(blocks, x_train[idx], l_S, l_R)
        loss = _loss(method, logits, y_train[idx], a_hat, a_star[idx] if a_star is not None else None, alpha, rec)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * int(idx.numel())
        count += int(idx.numel())
    return total / count


def posttrain_run(
    baseline: nn.Module,
    l_S: int,
    l_R: int,
    method: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    a_star: torch.Tensor | None = None,
    alpha: float = 0.1,
    rec: str = "mse",
    epochs: int = 10,
    lr: float = 1e-3,
    optimizer: str = "adam",
    momentum: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    return_model: bool = False,
) -> dict:
    """Post-train layers ``l_S+1 … l_R`` of a copy of ``baseline`` by FR-PT or BP-PT.

    The data order of epoch ``e`` is ``randperm`` of a generator seeded with ``seed`` — the
    same for both methods.  Returns ``{"test_acc": [acc after epoch 1, …], "train_loss": […],
    "frozen_unchanged": True, "seconds": …}`` (plus ``"model"`` with ``return_model``);
    raises ``RuntimeError`` if a frozen parameter changed (checked bitwise).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    if method == "FR" and a_star is None:
        raise ValueError("method='FR' needs a_star (the reconstructed a*_{l_R} of every training instance)")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs}, batch_size={batch_size}: both must be >= 1")
    model = copy.deepcopy(baseline)
    params = set_trainable(model, l_S, l_R)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = make_optimizer(params, optimizer, lr, momentum)
    blocks = model_blocks(model)
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))  # any stochastic module (none in the seed 001 baselines)
    accs, losses = [], []
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(int(x_train.shape[0]), generator=gen)
        losses.append(_epoch(model, blocks, opt, method, x_train, y_train, a_star, perm, l_S, l_R, alpha, rec,
                             batch_size))
        accs.append(accuracy_percent(model, x_test, y_test))
    changed = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p.detach(), frozen[n])]
    if changed:
        raise RuntimeError(f"frozen parameters changed during post-training of ({l_S}, {l_R}): {changed}")
    out = {"test_acc": accs, "train_loss": losses, "frozen_unchanged": True, "seconds": time.perf_counter() - t0}
    if return_model:
        out["model"] = model
    return out


def training_memory(
    baseline: nn.Module,
    l_S: int,
    l_R: int,
    method: str,
    xb: torch.Tensor,
    yb: torch.Tensor,
    a_star_b: torch.Tensor | None,
    *,
    optimizer: str = "adam",
    momentum: float = 0.0,
    alpha: float = 0.1,
    rec: str = "mse",
) -> dict:
    """Peak tensor memory of one training step (MB = 2**20 bytes), by tensor accounting.

    ``saved`` — the bytes of the tensors autograd keeps for backward — is measured with
    ``saved_tensors_hooks`` on one forward pass of the batch (storages deduplicated, parameter
    and batch storages excluded because they are counted in their own terms); the other terms
    are exact sizes: all parameters, gradients of the trained ones, optimiser state (Adam: 2
    per trained parameter, SGD with momentum: 1, plain SGD: 0), the batch, and for FR the batch
    of ``a*`` targets.  Returns ``{"mem_mb": …, "mem_terms_bytes": {term: bytes}}``.
    """
    model = copy.deepcopy(baseline)
    params = set_trainable(model, l_S, l_R)
    blocks = model_blocks(model)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch = [xb, yb] + ([a_star_b] if (method == "FR" and a_star_b is not None) else [])
    batch_ptrs = {t.untyped_storage().data_ptr() for t in batch}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in param_ptrs and ptr not in batch_ptrs:
            saved[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, a_hat = forward_split(blocks, xb, l_S, l_R)
        loss = _loss(method, logits, yb, a_hat, a_star_b, alpha, rec)
    loss.backward()

    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    trained = nbytes(params)
    states = _STATE_PER_PARAM["adam" if optimizer == "adam" else ("sgd_momentum" if momentum else "sgd")]
    terms = {
        "params": nbytes(list(model.parameters())),
        "grads": trained,
        "optimizer_state": states * trained,
        "batch": nbytes(batch),
        "saved_activations": sum(saved.values()),
    }
    return {"mem_mb": sum(terms.values()) / 2**20, "mem_terms_bytes": terms}
