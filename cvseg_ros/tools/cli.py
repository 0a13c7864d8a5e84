"""`cvseg`: the command-line tool. Each command lives in its own module with a ``register``."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cvseg_ros.codec.annexb import UnsupportedStreamError

# modules that add a sub-command (imported lazily so `cvseg probe` does not import torch)
COMMAND_MODULES = {
    "probe": "cvseg_ros.tools.probe",
    "transcode": "cvseg_ros.tools.transcode",
    "bag": "cvseg_ros.ros.bags",
    "replay": "cvseg_ros.ros.replay",
    "eval-bag": "cvseg_ros.ros.eval_bag",
    "demo": "cvseg_ros.tools.demo",
    "eval": "cvseg_ros.tools.evaluate",
    "heldout": "cvseg_ros.tools.heldout",
    "train": "cvseg_ros.training.train",
    "fuzz": "cvseg_ros.tools.fuzz",
    "soak": "cvseg_ros.tools.soak",
    "bench": "cvseg_ros.tools.bench",
    "gpu-check": "cvseg_ros.tools.gpu_check",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvseg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = set(COMMAND_MODULES.values()) if only is None else {COMMAND_MODULES[only]}
    for module in dict.fromkeys(COMMAND_MODULES.values()):
        if module in wanted:
            importlib.import_module(module).register(sub)
    for name in COMMAND_MODULES:   # the others are listed, their modules not imported
        if name not in sub.choices:
            sub.add_parser(name, help=f"(see `cvseg {name} --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in COMMAND_MODULES else None)
    args, extra = parser.parse_known_args(argv)
    if extra:   # only commands that take --key=value overrides accept unknown options
        if not getattr(args, "takes_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(getattr(args, "overrides", [])) + extra
    args.command_line = "cvseg " + " ".join(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UnsupportedStreamError, FileNotFoundError, ValueError) as exc:
        print(f"cvseg {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
