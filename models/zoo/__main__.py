"""``python -m models.zoo NAME OUT.pt [--size 32] [--width W] [--seed S] [--data D]``: save a
random-weight checkpoint of a zoo model (:func:`models.zoo.make_checkpoint`), then check it with
``linop verify --checkpoint OUT.pt``."""
from __future__ import annotations

import argparse
import json
import sys

from . import ZOO, make_checkpoint


def main(argv: list[str] | None = None) -> int:
    """Bad input: one argparse error line, exit 2."""
    p = argparse.ArgumentParser(prog="python -m models.zoo", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(ZOO), metavar="NAME", help=f"one of {sorted(ZOO)}")
    p.add_argument("out", metavar="OUT.pt")
    p.add_argument("--size", type=int, default=32, help="input side (default 32)")
    p.add_argument("--width", type=float, default=None, help="width multiplier (default 1: torchvision's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--data", default=None, help="data set recorded for linop verify (default photos<size>)")
    p.add_argument("--kwargs", default=None, help='extra factory kwargs as JSON, e.g. \'{"small_input": true}\'')
    args = p.parse_args(argv)
    try:
        extra = json.loads(args.kwargs) if args.kwargs else {}
        if not isinstance(extra, dict):
            raise ValueError(f"--kwargs={args.kwargs!r} must be a JSON object")
        meta = make_checkpoint(args.name, args.out, input_size=args.size, width=args.width,
                               seed=args.seed, data=args.data, num_classes=args.num_classes, **extra)
    except json.JSONDecodeError as exc:
        p.error(f"--kwargs={args.kwargs!r} is not JSON ({exc})")
    except ValueError as exc:
        p.error((str(exc).strip().splitlines() or ["ValueError"])[0])
    print(f"{args.name}: {meta['parameters']:,} parameters, input {meta['input_shape']}, data "
          f"{meta['data']}, {meta['weights']} -> {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
