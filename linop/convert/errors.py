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

__all__ = ["ConversionError", "Problem", "node_source", "source_frame", "target_name"]

_TORCH_DIR = os.path.dirname(torch.__file__)
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
    """

    node: str
    op: str
    target: str
    where: str
    reason: str

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
        """One error for all ``problems`` of ``model`` (the single-problem text is one line)."""
        if len(problems) == 1:
            msg = f"from_torch({model}): cannot convert {problems[0]}. {_HINT}"
        else:
            lines = "\n".join(f"  - {p}" for p in problems)
            msg = f"from_torch({model}): cannot convert {len(problems)} fx nodes:\n{lines}\n{_HINT}"
        return cls(msg, tuple(problems))


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


def problem(node: fx.Node, reason: str, module_type: str | None = None) -> Problem:
    """The :class:`Problem` record of ``node`` (``module_type`` for ``call_module`` nodes)."""
    fr = source_frame(node)
    where = f" at {fr[0]}:{fr[1]} `{fr[2]}`" if fr else ""
    kind = f" [{module_type}]" if module_type else ""
    return Problem(node.name, node.op, f"{target_name(node)}{kind}", where, reason)
