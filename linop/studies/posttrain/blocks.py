"""Layers of a post-trained CNN (seed 001 §4): blocks, (l_S, l_R) pairs, freezing, splitting.

A converged baseline is split into ``L`` *layers*: layer ``l`` (1 ≤ l ≤ L) is the output of
block ``l`` (``model.blocks[l - 1]`` — a conv block or a fully connected layer; layer ``L``
is the output vector ``â_L``); layer 0 is the input.  A pair ``(l_S, l_R)`` with
``0 ≤ l_S < l_R ≤ L`` post-trains blocks ``l_S+1 … l_R`` and freezes the rest.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "accuracy_percent",
    "check_block_decomposition",
    "default_pairs",
    "forward_split",
    "layer_features",
    "model_blocks",
    "parse_pair",
    "set_trainable",
    "trainable_parameter_count",
    "validate_pairs",
]


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` in forward order: ``model.blocks`` (then ``model.classifier``
    if there is one) or the children of an ``nn.Sequential``."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        head = getattr(model, "classifier", None)  # KConvMFC: a_L = classifier(a_{L-1})
        return list(blocks) + ([head] if isinstance(head, nn.Module) else [])
    if isinstance(model, nn.Sequential):
        return list(model)
    raise ValueError(
        f"model of type {type(model).__name__}: post-training needs the layers in forward order, "
        "as an nn.ModuleList attribute `blocks` (seed 001 baselines in models.baselines) or an "
        "nn.Sequential"
    )


def check_block_decomposition(model: nn.Module, x: torch.Tensor) -> None:
    """Raise ``ValueError`` if running the blocks one after another does not reproduce
    ``model(x)`` bit for bit."""
    with torch.no_grad():
        ref = model(x)
        h = x
        for b in model_blocks(model):
            h = b(h)
    if ref.shape != h.shape or not torch.equal(ref, h):
        raise ValueError(
            f"{type(model).__name__}: composing model.blocks does not reproduce model(x) "
            "(the study needs forward == blocks applied in order)"
        )


def default_pairs(n_layers: int) -> list[tuple[int, int]]:
    """Every ``(l_S, l_R)`` with ``0 ≤ l_S < l_R ≤ L``, ordered as in seed 001 Tables 1-6."""
    return [(s, r) for r in range(1, n_layers + 1) for s in range(r)]


def parse_pair(text: str) -> tuple[int, int]:
    """``"1:3"`` (or ``"1,3"``) -> ``(1, 3)``."""
    for sep in (":", ","):
        if sep in text:
            a, b = text.split(sep, 1)
            try:
                return int(a), int(b)
            except ValueError:
                break
    raise ValueError(f"pair {text!r}: expected 'l_S:l_R', e.g. '1:3'")


def validate_pairs(pairs: Iterable[Sequence[int]], n_layers: int) -> list[tuple[int, int]]:
    """The distinct pairs in order; ``ValueError`` naming the first with ``not 0 ≤ l_S < l_R ≤ L``."""
    out: list[tuple[int, int]] = []
    for p in pairs:
        s, r = (int(v) for v in p)
        if not 0 <= s < r <= n_layers:
            raise ValueError(
                f"pair (l_S, l_R)=({s}, {r}): need 0 <= l_S < l_R <= L={n_layers} "
                "(layers l_S+1..l_R are post-trained)"
            )
        if (s, r) not in out:
            out.append((s, r))
    if not out:
        raise ValueError("pairs: no (l_S, l_R) pair selected")
    return out


def _unique_params(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:  # a parameter shared by two blocks counts once
                seen.add(id(p))
                out.append(p)
    return out


def set_trainable(model: nn.Module, l_S: int, l_R: int) -> list[nn.Parameter]:
    """Freeze every parameter except those of layers ``l_S+1 … l_R``; return the trainable ones."""
    blocks = model_blocks(model)
    validate_pairs([(l_S, l_R)], len(blocks))
    for p in model.parameters():
        p.requires_grad_(False)
    params = _unique_params(blocks[l_S:l_R])
    for p in params:
        p.requires_grad_(True)
    return params


def trainable_parameter_count(model: nn.Module, l_S: int, l_R: int) -> int:
    """Number of scalars post-trained for ``(l_S, l_R)`` (the "#paras" column)."""
    blocks = model_blocks(model)
    validate_pairs([(l_S, l_R)], len(blocks))
    return int(sum(p.numel() for p in _unique_params(blocks[l_S:l_R])))


def forward_split(blocks: Sequence[nn.Module], x: torch.Tensor, l_S: int, l_R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(â_L, â_{l_R})``; the frozen layers below ``l_S`` run without building a graph."""
    h = x
    with torch.no_grad():
        for b in blocks[:l_S]:
            h = b(h)
    for b in blocks[l_S:l_R]:
        h = b(h)
    a_hat = h
    for b in blocks[l_R:]:
        h = b(h)
    return h, a_hat


@torch.no_grad()
def layer_features(model: nn.Module, x: torch.Tensor, layer: int, chunk: int = 1024) -> torch.Tensor:
    """Forward feature map ``â_layer`` for every row of ``x`` (chunked)."""
    blocks = model_blocks(model)
    outs = []
    for i in range(0, x.shape[0], chunk):
        h = x[i : i + chunk]
        for b in blocks[:layer]:
            h = b(h)
        outs.append(h)
    return torch.cat(outs)


@torch.no_grad()
def accuracy_percent(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> float:
    """Test accuracy in percent (the model's train / eval mode is restored)."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], chunk):
        correct += int((model(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum())
    model.train(was)
    return 100.0 * correct / int(x.shape[0])
