"""The reconstruction study: the ``linop reconstruct`` command and the seed 001 Fig. 4 plot."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..network import EquivalentNetwork
from ..reverse import steps as inverse
from ..reverse.walk import EMBEDDINGS, Reconstruction, reconstruct
from ..solvers import METHODS as SOLVE_METHODS

__all__ = ["plot_discrepancy", "add_arguments", "run"]


# ----------------------------------------------------------------------------- figure
def plot_discrepancy(rec: Reconstruction, node: str, path: str | Path, sample: int = 0, max_channels: int = 32) -> Path:
    """|â_l − a*_l| per channel for one sample (seed 001 Fig. 4), written as a PNG.

    A (C, H, W) feature gives one panel per channel (up to ``max_channels``) on a shared
    colour scale; a vector gives a single strip.  Uses the Agg canvas directly (no global
    matplotlib backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if node not in rec.features:
        raise ValueError(f"node {node!r} was not reconstructed/kept; available: {sorted(rec.features)}")
    N = rec.features[node].shape[0]
    if not (0 <= sample < N):
        raise ValueError(f"sample must be in [0, {N}), got {sample}")
    d = (rec.forward[node][sample] - rec.features[node][sample]).abs().detach().cpu().double().numpy()
    if d.ndim == 1:
        d = d[None, None, :]
    elif d.ndim == 2:
        d = d[None]
    C = min(d.shape[0], max_channels)
    cols = min(C, 8)
    rows = -(-C // cols)
    size = (max(1.8 * cols + 1.0, 5.5), 1.8 * rows + 0.8) if d.shape[1] > 1 else (8.0, 2.4)
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(top=1.0 - 0.7 / size[1], right=0.85)  # room for the two-line title
    vmax = float(d[:C].max()) or 1.0
    im = None
    for c in range(C):
        ax = fig.add_subplot(rows, cols, c + 1)
        im = ax.imshow(d[c], cmap="jet", vmin=0.0, vmax=vmax, interpolation="nearest", aspect="auto" if d.shape[1] == 1 else "equal")
        ax.set_xticks([])
        ax.set_yticks([])
        if C > 1:
            ax.set_title(f"ch {c}", fontsize=7)
    fig.colorbar(im, cax=fig.add_axes((0.88, 0.15, 0.02, 0.6)))
    rel = float(rec.deviation[node]["rel"][sample])
    fig.suptitle(f"|â − a*| at {node}\n(sample {sample}, label {int(rec.labels[sample])}, rel. dev. {rel:.3g})", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", default="models/checkpoints/conv2_fc1_digits.pt",
                        help="trained seed 001 baseline (models.train checkpoint)")
    parser.add_argument("--data", default=None,
                        help="data set name for models.data.load_dataset (default: the checkpoint's)")
    parser.add_argument("--root", default=None, help="directory of cifar10 / cifar100 / mnist files")
    parser.add_argument("--n", type=int, default=16, help="number of test samples to reconstruct")
    parser.add_argument("--to-layer", default="input", help="'input', a node name, or U / U:in / U:out for a unit layer U")
    parser.add_argument("--embedding", default="ne", choices=EMBEDDINGS)
    parser.add_argument("--solver", default="auto", help="linop.solve method (auto, dense, lsmr, cg, fft, fft-pcg, fft-exact)")
    parser.add_argument("--tol", type=float, default=1e-10)
    parser.add_argument("--maxiter", type=int, default=None)
    parser.add_argument("--maxpool", default="copy", choices=inverse.MAXPOOL_MODES)
    parser.add_argument("--avgpool", default="copy", choices=inverse.AVGPOOL_MODES)
    parser.add_argument("--clip-margin", type=float, default=inverse.DEFAULT_CLIP_MARGIN)
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    parser.add_argument("--sample", type=int, default=None,
                        help="sample drawn in the discrepancy figures (default: the first one the embedding changed)")
    parser.add_argument("--out", default="results/reconstruct", help="output directory (JSON + PNG)")


def run(args) -> int:
    from ..convert import from_torch
    from models.data import load_dataset
    from models.train import load_checkpoint

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.solver not in SOLVE_METHODS:  # else only the first linear step would notice
        raise ValueError(f"--solver must be one of {SOLVE_METHODS}, got {args.solver!r}")
    if args.sample is not None and not 0 <= args.sample < args.n:
        raise ValueError(f"--sample must lie in [0, --n={args.n}), got {args.sample}")
    model, meta = load_checkpoint(args.checkpoint)
    model.eval()
    if args.data is None:
        args.data = meta.get("data", "digits")
    norm = meta.get("normalize", "none")
    if norm == "custom":  # the checkpoint's own (mean, std)
        norm = (meta["mean"], meta["std"])
    data = load_dataset(args.data, root=args.root, normalize=norm)
    x_test, y_test = _test_split(data)
    if args.n > len(x_test):
        raise ValueError(f"--n {args.n} is more than the {len(x_test)} test samples of {args.data}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x = torch.as_tensor(np.asarray(x_test[: args.n]))
    y = torch.as_tensor(np.asarray(y_test[: args.n])).long()
    dtype = getattr(torch, args.dtype)
    net = from_torch(model, tuple(x.shape[1:]), dtype=dtype)
    t0 = time.perf_counter()
    rec = reconstruct(net, x.to(dtype), y, to_layer=args.to_layer, embedding=args.embedding, solver=args.solver,
                      tol=args.tol, maxiter=args.maxiter, clip_margin=args.clip_margin, maxpool=args.maxpool,
                      avgpool=args.avgpool, progress=True)
    secs = time.perf_counter() - t0
    summ = rec.summary()
    summ.update(checkpoint=str(args.checkpoint), data=args.data, dtype=args.dtype, seconds=round(secs, 3),
                solver=args.solver, maxpool=args.maxpool, avgpool=args.avgpool,
                n_changed_at_output=int((rec.target != rec.forward[rec.output]).any(1).sum()))
    with open(out / "reconstruct.json", "w") as fh:
        json.dump(summ, fh, indent=2)
    print(f"reconstructed {summ['n']} samples of {args.data} to {rec.to_layer!r} ({args.embedding}, "
          f"{args.dtype}) in {secs:.2f} s; {summ['n_changed_at_output']} changed by the embedding")
    print(f"{'node':<22}{'step':<16}{'case':<12}{'method':<16}{'consist. max':>13}{'clipped':>9}"
          f"{'rel dev mean':>14}{'rel dev max':>13}")
    for s in summ["steps"]:
        dv = summ["deviation"].get(s["node"], {})
        clip = str(s["n_clipped"]) if "n_clipped" in s else "-"
        print(f"{s['node']:<22}{s['kind']:<16}{str(s['case'] or '-'):<12}{str(s['method'] or '-'):<16}"
              f"{s['consistency_max']:>13.2e}{clip:>9}{dv.get('rel_mean', float('nan')):>14.3e}"
              f"{dv.get('rel_max', float('nan')):>13.3e}")
    dv = summ["deviation"][rec.to_layer]
    print(f"{rec.to_layer:<22}{'(to_layer)':<16}{'':<12}{'':<16}{'':>13}{'':>9}{dv['rel_mean']:>14.3e}{dv['rel_max']:>13.3e}")
    print("consist. = ||f(a*_in) - z*|| / ||z*|| per step (0 / ~1e-15: exact; CCP steps and clipped "
          "activations cannot be exact); rel dev = ||a* - â|| / ||â|| of the node's feature")
    changed = np.flatnonzero((rec.target != rec.forward[rec.output]).any(1).cpu().numpy())
    if args.sample is None:  # draw a sample the label actually moved (else nothing to see)
        sample = int(changed[0]) if changed.size else 0
    else:
        sample = args.sample
    figs = []
    for name in _figure_nodes(net, rec):
        figs.append(str(plot_discrepancy(rec, name, out / f"discrepancy_{name}.png", sample=sample)))
    print(f"wrote {out / 'reconstruct.json'} and {len(figs)} figure(s) of sample {sample}: {', '.join(figs)}")
    return 0


def _test_split(data: Any) -> tuple[Any, Any]:
    """(x_test, y_test) from what models.data.load_dataset returns (tuple or mapping)."""
    if isinstance(data, dict):
        return data["x_test"], data["y_test"]
    for a, b in (("x_test", "y_test"),):
        if hasattr(data, a):
            return getattr(data, a), getattr(data, b)
    if isinstance(data, (tuple, list)) and len(data) >= 4:
        return data[2], data[3]
    raise ValueError(f"cannot find the test split in what load_dataset returned ({type(data).__name__})")


def _figure_nodes(net: EquivalentNetwork, rec: Reconstruction) -> list[str]:
    """The features a_l drawn in Fig. 4: the inputs of the unit layers (and to_layer), if kept."""
    names = [net.unit_node(u).inputs[0] for u in net.unit_layers] + [rec.to_layer]
    seen, out = set(), []
    for n in names:
        if n in rec.features and n not in seen:
            seen.add(n)
            out.append(n)
    return out
