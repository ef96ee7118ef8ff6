r"""The Jacobian of one layer in the compressed-window representation (:class:`LayerJacobian`).

Row ``u`` of a layer's Jacobian w.r.t. the image lives in ``u``'s receptive-field window; a
sweep (:mod:`linop.linearize.sweep`) delivers it as tangents compressed with period ``P``
(see :mod:`linop.linearize.tangents`).  Densification (:meth:`LayerJacobian.image`, the RM2
layout ``(U, C, H, W)``) is one transposed copy of the tangents (:func:`unit_major_copy`) plus, while
``P < (H, W)``, one gather with a cached colour index (pixels outside a window read an exact
structural zero), optionally into a reused preallocated ``out`` buffer; in the dense regime it
is the transposed copy alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .tangents import spatial_groups

__all__ = ["LayerJacobian"]


#: tangents per block of :func:`unit_major_copy` (its scratch: ``S·G·64`` entries, 8 MiB for a
#: float32 32×32×32 layer); 64–512 measured within 15 % of each other
UNIT_MAJOR_BLOCK = 64


def unit_major_copy(buf: torch.Tensor, Tcl: torch.Tensor) -> torch.Tensor:
    r"""``buf`` ``(G, S, n)`` ← the contiguous channels-last batch view ``Tcl`` ``(n, S, G)``
    unit-major: ``buf[g, s, t] = Tcl[t, s, g]`` (unit ``(g, s)``'s tangents one contiguous row).

    Evaluation strategy, the same values moved (bit for bit): the direct
    ``buf.copy_(Tcl.permute(2, 1, 0))`` reads the batch with a stride of ``S·G`` entries along
    each output row (0.6–0.7 GB/s here, every read on another page).  On the CPU each block of
    :data:`UNIT_MAJOR_BLOCK` tangents — a contiguous ``(b, S·G)`` matrix — goes through torch's
    cache-blocked 2-D transposed copy into a ``(S·G, b)`` scratch, whose rows are then copied in
    ``(g, s)`` order as runs of ``b`` entries: 3.9–5.5 GB/s (3,072 tangents of a 32×32×32 /
    16×16×64 / 8×8×96 layer: 0.21 / 0.08 / 0.03 s instead of 1.44 / 0.71 / 0.21 s, one thread).
    A block loop, not a loop over units or tangents."""
    n, S, G = Tcl.shape
    dst = buf.view(G, S, n)
    if Tcl.device.type != "cpu" or n * S * G == 0:  # the device's transpose kernel is its own strategy
        return dst.copy_(Tcl.permute(2, 1, 0))
    b = min(n, UNIT_MAJOR_BLOCK)
    flat = Tcl.reshape(n, S * G)
    scratch = Tcl.new_empty(S * G * b)
    for r0 in range(0, n, b):
        w = min(b, n - r0)
        sc = scratch[:S * G * w].view(S * G, w)
        sc.copy_(flat[r0:r0 + w].t())  # contiguous destination, (1, S·G)-strided source: the blocked path
        dst[:, :, r0:r0 + w].copy_(sc.view(S, G, w).permute(1, 0, 2))  # rows of w contiguous entries
    return dst


def _out_view(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A contiguous ``shape`` view of the preallocated ``out`` (or a new tensor)."""
    n = int(np.prod(shape))
    if out is None:
        return like.new_empty(shape)
    if not isinstance(out, torch.Tensor) or out.dtype != like.dtype or out.device != like.device \
            or not out.is_contiguous() or out.numel() < n:
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}, contiguous={out.is_contiguous()}"
               if isinstance(out, torch.Tensor) else type(out).__name__)
        raise ValueError(f"out must be a contiguous {like.dtype} tensor on {like.device} with at least "
                         f"{n:,} elements for shape {shape}; got {got}")
    return out.reshape(-1)[:n].view(shape)


@dataclass
class LayerJacobian:
    r"""Jacobian of one node's output (a unit layer's *pre-bias* value ``c_l``) w.r.t. ``[x; x_b]``.

    Row ``u`` (flat C-order index into ``out_shape``) is the effective hypersurface
    ``H_u = (W_l Σ_{l-1} J_{l-1})ᵀ e_u`` (seed 000 Eq. 4/5), stored compressed: image part
    ``Ti[c, a, b, u]`` with period ``P`` and per-unit windows (origin ``oy, ox``, size ``ry, rx``),
    bias part ``Tb[k, u]`` for the bias entries ``cols`` (all other bias entries are 0).
    ``channels`` lists the image channels this object covers (all, unless computed in
    column groups).  Use :meth:`image`, :meth:`bias`, :meth:`dot`, :meth:`windows`.

    The sweep hands over its batches ``T`` / ``B`` as computed (4-D CPU batches are
    channels-last, :data:`linop.linearize.tangents.CHANNELS_LAST`); :meth:`dot` and the
    all-unit :meth:`image` read them in place, ``Ti`` / ``Tb`` are C-order copies made on first
    use (and kept).
    """

    name: str
    out_shape: tuple[int, ...]
    image_shape: tuple[int, int, int]
    n_bias: int
    channels: torch.Tensor
    P: tuple[int, int]
    ry: int
    rx: int
    oy: torch.Tensor
    ox: torch.Tensor
    #: the image tangents as the sweep's batch ``(nc·Py·Px, *out_shape)``, in any memory format
    #: (the sweep keeps 4-D batches channels-last); :attr:`Ti` is its ``(nc, Py, Px, U)`` view
    T: torch.Tensor
    #: the bias tangents as a batch ``(nb, *out_shape)`` in any memory format; :attr:`Tb` is ``(nb, U)``
    B: torch.Tensor
    cols: torch.Tensor
    #: the node's x-independent geometry (index caches); None when built by hand
    geom: Any = field(default=None, repr=False, compare=False)
    #: tangents per chunk of :meth:`dot`'s elementwise products (the sweep's memory plan); None: all
    chunk: int | None = field(default=None, repr=False, compare=False)

    @property
    def Ti(self) -> torch.Tensor:
        """Image tangents ``(nc, Py, Px, U)``, units flat in C order (a copy, made once, when
        the batch is channels-last)."""
        hit = self.__dict__.get("_Ti")
        if hit is None:
            hit = self.T.reshape(self.channels.numel(), self.P[0], self.P[1], self.n_units)
            self.__dict__["_Ti"] = hit
        return hit

    @property
    def Tb(self) -> torch.Tensor:
        """Bias tangents ``(nb, U)`` for the bias entries ``cols``."""
        hit = self.__dict__.get("_Tb")
        if hit is None:
            hit = self.B.reshape(self.B.shape[0], self.n_units)
            self.__dict__["_Tb"] = hit
        return hit

    @property
    def n_units(self) -> int:
        return int(np.prod(self.T.shape[1:]))

    def _cl_view(self, T: torch.Tensor) -> torch.Tensor | None:
        """``(n, S, C)`` view of a channels-last ``(n, C, H, W)`` batch (``S = H·W``; unit
        ``(c, s)`` is entry ``[:, s, c]``), or None when ``T`` is not stored channels-last."""
        if T.dim() != 4 or T.is_contiguous() or not T.is_contiguous(memory_format=torch.channels_last):
            return None
        n, C, H, W = T.shape
        return T.permute(0, 2, 3, 1).reshape(n, H * W, C)

    def _units(self, units: Any) -> torch.Tensor:
        if units is None:
            return torch.arange(self.n_units, device=self.T.device)
        u = torch.as_tensor(units, dtype=torch.long, device=self.T.device).reshape(-1)
        if u.numel() and (int(u.min()) < 0 or int(u.max()) >= self.n_units):
            raise ValueError(f"{self.name}: units must be flat indices in [0, {self.n_units}), got min {int(u.min())}, max {int(u.max())}")
        return u

    def image(self, units: Any = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense image parts ``H^I``, shape ``(k, C, H, W)`` for the selected units (RM2 layout).

        ``out``: optional preallocated contiguous tensor of the Jacobian's dtype/device with at
        least ``k·C·H·W`` elements (e.g. one buffer reused across layers, which avoids paying
        the first-touch page faults of a fresh multi-hundred-MB array per layer); the result is
        a view of its first ``k·C·H·W`` entries.

        One pass over the output: ``H^I[u, c, y, x] = T[c, (y mod P_y, x mod P_x), u]`` inside
        ``u``'s window and 0 outside is a single gather from the unit-major compressed tangents
        with an x-independent ``(S, H·W)`` colour index (cached per node), the zero outside the
        window being an extra zero colour.
        """
        u = self._units(units)
        C, H, W = self.image_shape
        nc = self.channels.numel()
        k = u.numel()
        Py, Px = self.P
        full_chans = nc == C and torch.equal(self.channels.cpu(), torch.arange(C))
        dst = _out_view(out, (k, C, H, W), self.T) if full_chans else self.T.new_empty((k, nc, H, W))
        all_units = k == self.n_units and bool((u == torch.arange(self.n_units, device=u.device)).all())
        L = Py * Px
        Tcl = self._cl_view(self.T) if all_units else None  # (nc·L, S, G) of a channels-last batch
        # tangent-major (materialised from a channels-last batch only when a subset is asked for)
        T2 = self.Ti.reshape(nc * L, self.n_units) if Tcl is None else None

        def unit_major(buf: torch.Tensor) -> None:
            """``buf`` (U, nc·L) ← the tangents unit-major: one transposed copy in either layout."""
            if Tcl is not None:  # unit (g, s) of a (n, S, G) batch
                unit_major_copy(buf, Tcl)
            else:
                buf.copy_(T2.t())

        if (Py, Px) == (H, W):
            # dense regime: colour (c, a, b) is pixel (c, a, b); outside a unit's window the
            # tangents are exact zeros already (structurally zero Jacobian entries), so H^I is
            # the transposed tangent batch — one 2-D transposed copy
            if all_units:
                unit_major(dst.view(k, nc * L))
            else:
                dst.view(k, nc * L).copy_(T2.index_select(1, u).t())
        else:
            G, S = (spatial_groups(self.geom, self.out_shape) if self.geom is not None else (1, self.n_units))
            idx, mask = self._colour_index(S)  # (S, nc·H·W) colours, (S, H·W) window mask or None
            chunk = k if all_units else max(1, (1 << 22) // max(1, nc * H * W))  # bounds the per-unit index
            for a0 in range(0, k, chunk):
                uu = u[a0:a0 + chunk]
                kk = uu.numel()
                Tt = self.T.new_empty((kk, nc * L))
                if all_units:  # unit-major, colour last
                    unit_major(Tt)
                else:
                    Tt.copy_(T2.index_select(1, uu).t())
                d = dst[a0:a0 + kk]
                if all_units:
                    torch.gather(Tt.view(G, S, nc * L), 2, idx.view(1, S, nc * H * W).expand(G, S, nc * H * W),
                                 out=d.view(G, S, nc * H * W))
                    if mask is not None:
                        d.view(G, S, nc, H * W).mul_(mask.view(1, S, 1, H * W))
                else:
                    s_u = torch.remainder(uu, S).to(idx.device)
                    torch.gather(Tt, 1, idx.index_select(0, s_u), out=d.view(kk, nc * H * W))
                    if mask is not None:
                        d.view(kk, nc, H * W).mul_(mask.index_select(0, s_u)[:, None, :])
        if full_chans:
            return dst
        fullo = _out_view(out, (k, C, H, W), self.T)
        fullo.zero_()
        fullo[:, self.channels.to(u.device)] = dst
        return fullo

    def _colour_index(self, S: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x-independent gather index of the densification, cached per node: ``(S, nc·H·W)``,
        the column ``c·P_y·P_x + (y mod P_y)·P_x + x mod P_x`` of the unit-major compressed
        tangents for pixel (c, y, x) of the unit at spatial position s.  Outside the unit's
        window the pixel must read 0: where the period exceeds the window (``P_y > r_y`` or
        ``P_x > r_x``) it reads a residue row/column that holds no window pixel, whose colour is
        an exact structural zero, and no mask is needed; otherwise a ``(S, H·W)`` 0/1 mask is
        returned to multiply by."""
        C, H, W = self.image_shape
        nc = self.channels.numel()
        Py, Px = self.P
        key = ("colour", self.P, (self.ry, self.rx), S, nc, str(self.T.device), self.T.dtype)
        cache = self.geom.cache if self.geom is not None else {}
        hit = cache.get(key)
        if hit is None:
            dev = self.T.device
            oy, ox = self.oy[:S].to(dev), self.ox[:S].to(dev)
            y = torch.arange(H, device=dev)
            xx = torch.arange(W, device=dev)
            iny = (y[None] >= oy[:, None]) & (y[None] < oy[:, None] + self.ry)  # (S, H)
            inx = (xx[None] >= ox[:, None]) & (xx[None] < ox[:, None] + self.rx)  # (S, W)
            ry = torch.remainder(y, Py)[None].expand(S, H)
            rx = torch.remainder(xx, Px)[None].expand(S, W)
            mask = None
            if Py > self.ry:  # residue (oy + ry) mod Py holds no window row: a zero colour row
                zy = torch.remainder(oy + self.ry, Py)[:, None]
                col = torch.where(iny[:, :, None] & inx[:, None, :], ry[:, :, None] * Px + rx[:, None, :],
                                  (zy * Px)[:, :, None].expand(S, H, W))
            elif Px > self.rx:
                zx = torch.remainder(ox + self.rx, Px)[:, None]
                col = torch.where(iny[:, :, None] & inx[:, None, :], ry[:, :, None] * Px + rx[:, None, :],
                                  zx[:, :, None].expand(S, H, W))
            else:
                col = (ry[:, :, None] * Px + rx[:, None, :])
                mask = (iny[:, :, None] & inx[:, None, :]).reshape(S, H * W).to(self.T.dtype)
            col = col.reshape(S, 1, H * W) + (torch.arange(nc, device=dev) * (Py * Px))[None, :, None]
            hit = (col.reshape(S, nc * H * W).contiguous(), mask)
            cache[key] = hit
        return hit

    def bias(self, units: Any = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense bias parts ``H^b``, shape ``(k, n_b)`` (``out``: optional buffer, as in :meth:`image`)."""
        u = self._units(units)
        k = u.numel()
        dst = _out_view(out, (k, self.n_bias), self.B)
        n = self.cols.numel()
        all_units = k == self.n_units and bool((u == torch.arange(self.n_units, device=u.device)).all())
        Tb = self.Tb if all_units else self.Tb.index_select(1, u)
        if n and n == self.n_bias:  # cols is sorted and unique: all of x_b
            dst.copy_(Tb.T)
            return dst
        dst.zero_()
        if n:
            c0 = int(self.cols[0])
            if int(self.cols[-1]) - c0 + 1 == n:  # a contiguous block of x_b (the usual case)
                dst[:, c0:c0 + n].copy_(Tb.T)
            else:
                dst[:, self.cols.to(u.device)] = Tb.T
        return dst

    def _take(self, u: torch.Tensor) -> torch.Tensor:
        """``Ti`` restricted to units ``u`` as a (k, nc, Py, Px) view/copy (no copy for all units)."""
        if u.numel() == self.n_units and bool((u == torch.arange(self.n_units, device=u.device)).all()):
            return self.Ti.permute(3, 0, 1, 2)
        return self.Ti.index_select(3, u).permute(3, 0, 1, 2)

    def windows(self, units: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-unit windows of the image part: ``(patches (k, C, ry, rx), oy (k,), ox (k,))``."""
        u = self._units(units)
        oy, ox = self.oy.to(u.device)[u], self.ox.to(u.device)[u]
        dy = torch.remainder(oy[:, None] + torch.arange(self.ry, device=u.device)[None], self.P[0])
        dx = torch.remainder(ox[:, None] + torch.arange(self.rx, device=u.device)[None], self.P[1])
        T = self._take(u)  # (k, nc, Py, Px)
        k, nc = T.shape[:2]
        T = T.gather(2, dy[:, None, :, None].expand(k, nc, self.ry, self.P[1]))
        return T.gather(3, dx[:, None, None, :].expand(k, nc, self.ry, self.rx)), oy, ox

    def dot(self, x: torch.Tensor, x_b: torch.Tensor | None = None) -> torch.Tensor:
        """``<x, H^I_u> + <x_b, H^b_u>`` for every unit (flat, C-order), without forming H.

        Reads the tangent batches in their stored memory format (channels-last batches through
        an ``(n, S, C)`` view: the same sums, no layout copy)."""
        C, H, W = self.image_shape
        x = x.reshape(C, H, W).to(self.T)
        xc = x.index_select(0, self.channels.to(x.device))
        U = self.n_units
        Py, Px = self.P
        nc = xc.shape[0]
        Tcl = self._cl_view(self.T)
        if (Py, Px) == (H, W):
            # dense regime: colour (c, a, b) is pixel (c, a, b), and outside a unit's window the
            # tangents are exact structural zeros: a matrix-vector product
            if Tcl is not None:
                n, S, G = Tcl.shape
                out = (xc.reshape(1, -1) @ Tcl.reshape(n, S * G)).reshape(S, G).t().reshape(U)
            else:
                out = self.T.reshape(-1, U).T @ xc.reshape(-1)
        else:
            xp = xc.new_zeros(nc, H + 1, W + 1)
            xp[:, :H, :W] = xc
            G, S = (spatial_groups(self.geom, self.out_shape) if self.geom is not None else (1, U))
            key = ("dot", self.P, (self.ry, self.rx), S, str(x.device))
            cache = self.geom.cache if self.geom is not None else {}
            flat = cache.get(key)
            if flat is None:
                def pix(o: torch.Tensor, P: int, r: int, n: int) -> torch.Tensor:
                    a = torch.arange(P, device=o.device)[:, None]
                    d = torch.remainder(a - o[None, :], P)
                    return torch.where(d < r, o[None, :] + d, torch.full_like(d, n))  # (P, S) pixel or n (zero)

                Y = pix(self.oy[:S].to(x.device), Py, self.ry, H)
                X = pix(self.ox[:S].to(x.device), Px, self.rx, W)
                flat = (Y[:, None, :] * (W + 1) + X[None, :, :]).reshape(-1)  # (Py·Px·S,), x-independent
                cache[key] = flat
            xg = xp.reshape(nc, (H + 1) * (W + 1)).index_select(1, flat)
            n = nc * Py * Px
            k = n if self.chunk is None else max(1, min(n, int(self.chunk)))  # bounds the product's size
            xg = xg.reshape(n, S)
            if Tcl is not None and (G, S) == (Tcl.shape[2], Tcl.shape[1]) and n:
                # channels-last: out[s, g] = Σ_{c,colour} x[c, colour, s]·T[(c, colour), s, g], one
                # (1 × n)·(n × G) product per position s — a batched GEMM reading the stored
                # batch in place (its (S, n, G) view has unit stride along g), no product temporary
                acc = torch.bmm(xg.t().unsqueeze(1), Tcl.permute(1, 0, 2)).reshape(S, G)
                out = acc.t().reshape(U)
            elif Tcl is not None and (G, S) == (Tcl.shape[2], Tcl.shape[1]):
                out = Tcl.new_zeros(U)
            else:
                T3 = self.T.reshape(n, G, S)
                acc = sum((T3[a:a + k] * xg[a:a + k, None, :]).sum(0) for a in range(0, n, k))
                out = (acc if n else T3.new_zeros(G, S)).reshape(U)
        if x_b is not None and self.cols.numel():
            xb = x_b.to(self.B).reshape(-1)[self.cols.to(x.device)]
            Bcl = self._cl_view(self.B)
            if Bcl is not None:
                n, S, G = Bcl.shape
                out = out + (xb.reshape(1, -1) @ Bcl.reshape(n, S * G)).reshape(S, G).t().reshape(U)
            else:
                out = out + self.Tb.T @ xb
        return out
