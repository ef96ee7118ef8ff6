"""Conversion errors and where an fx node came from (its user source line).

A conversion problem is reported against the fx node that caused it: its name, its ``op`` /
``target`` (and module type for ``call_module``) and the innermost *user* frame of its stack
trace (``file:line `code```), so the message points at the line of the model's ``forward``
that has no equivalent-network counterpart.  :class:`ConversionError` carries every problem
of a model at once (:attr:`ConversionError.problems`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import fx

__all__ = ["NOT_PIECEWISE_LINEAR", "UNSUPPORTED", "ConversionError", "Problem", "node_source",
           "source_frame", "target_name"]

_TORCH_DIR = os.path.dirname(torch.__file__)
UNSUPPORTED = "unsupported"
NOT_PIECEWISE_LINEAR = "not piecewise linear"
_NOT_PWL_TEXT = (
    "not piecewise linear: the identity <[x; x_b], H> = c (seed 000 appendix C) holds "
    "exactly only when every activation is piecewise linear (each unit then computes an "
    "affine function of [x; x_b] on its activation region); a smooth activation or a "
    "normalisation by data-dependent statistics has no such region, so no hypersurface H "
    "reproduces c exactly — replace these ops (e.g. ReLU / LeakyReLU, eval BatchNorm) or "
    "accept an approximation outside linop")
_HINT = ("Supported operations are listed in the linop.convert module docstring; "
         "add your own with linop.convert.register_converter.")


@dataclass(frozen=True)
class Problem:
    """One fx node that could not be converted.

    Attributes
    ----------
    node : str
        The fx node's name.
    op, target : str
        Its fx ``op`` and target (module type in brackets for ``call_module``).
    where : str
        `` at file:line `code``` of the user source line, or ``""`` when unknown.
    reason : str
        Why it has no equivalent-network counterpart.
    kind : str
        :data:`NOT_PIECEWISE_LINEAR` for an op the exact identity cannot hold for (smooth or
        data-normalising), else :data:`UNSUPPORTED` (no rule, or a form not implemented).
    """

    node: str
    op: str
    target: str
    where: str
    reason: str
    kind: str = UNSUPPORTED

    def __str__(self) -> str:
        return (f"fx node '{self.node}' (op={self.op}, target={self.target}){self.where}: "
                f"{self.reason}")


class ConversionError(NotImplementedError):
    """Operations with no equivalent-network counterpart (subclass of NotImplementedError).

    ``problems`` lists every unsupported fx node of the model (empty when the model could not
    be traced at all); the message names each node, its op / target and source line.
    """

    def __init__(self, message: str, problems: tuple[Problem, ...] = ()):
        super().__init__(message)
        self.problems = tuple(problems)

    @classmethod
    def from_problems(cls, model: str, problems: list[Problem]) -> ConversionError:
        """One error for all ``problems`` of ``model`` (the single-problem text is one line).

        Ops that are not piecewise linear are listed in a section of their own, with the
        reason the identity cannot be exact for them, before the ops that are merely not
        implemented."""
        bad = [p for p in problems if p.kind == NOT_PIECEWISE_LINEAR]
        other = [p for p in problems if p.kind != NOT_PIECEWISE_LINEAR]
        if not bad and len(other) == 1:
            return cls(f"from_torch({model}): cannot convert {other[0]}. {_HINT}", tuple(problems))
        plural = "s" if len(problems) > 1 else ""
        parts = [f"from_torch({model}): cannot convert {len(problems)} fx node{plural}:"]
        if bad:
            parts.append(f"{len(bad)} {_NOT_PWL_TEXT}:")
            parts += [f"  - {p}" for p in bad]
        if bad and other:
            parts.append(f"{len(other)} not implemented (no rule for the op, or for this form "
                         "of it):")
        parts += [f"  - {p}" for p in other]
        parts.append(_HINT)
        return cls("\n".join(parts), tuple(problems))


def source_frame(node: fx.Node) -> tuple[str, int, str] | None:
    """Innermost user (non-torch) frame ``(file, line, code)`` of the node's stack trace."""
    st = getattr(node, "stack_trace", None) or node.meta.get("stack_trace")
    if not st:
        return None
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n([^\n]*)', st)
    user = [f for f in frames if not os.path.abspath(f[0]).startswith(_TORCH_DIR)]
    if not user:
        return None
    f, line, code = user[-1]
    return f, int(line), code.strip()


def target_name(node: fx.Node) -> str:
    """The node's target as text: the string itself, or ``module.function``."""
    t = node.target
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    return f"{mod + '.' if mod else ''}{getattr(t, '__name__', repr(t))}"


def node_source(node: fx.Node) -> str:
    """``Node.source`` of the equivalent network: the module path for ``call_module``, else
    ``"fn @ file:line"``."""
    if node.op == "call_module":
        return str(node.target)
    fr = source_frame(node)
    where = f" @ {fr[0]}:{fr[1]}" if fr else ""
    return f"{target_name(node)}{where}"


def problem(node: fx.Node, reason: str, module_type: str | None = None,
            kind: str = UNSUPPORTED) -> Problem:
    """The :class:`Problem` record of ``node`` (``module_type`` for ``call_module`` nodes)."""
    fr = source_frame(node)
    where = f" at {fr[0]}:{fr[1]} `{fr[2]}`" if fr else ""
    mt = f" [{module_type}]" if module_type else ""
    return Problem(node.name, node.op, f"{target_name(node)}{mt}", where, reason, kind)
