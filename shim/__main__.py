"""python -m kubecash.shim [--broker ADDRESS] program.py args...

Runs an unmodified cuda-python program with its CUDA modules brokered: for when only the
command can be changed (the broker address comes from KUBECASH_BROKER or --broker)."""
from __future__ import annotations

import os
import runpy
import sys

from .inject import ENV, install


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--broker"] and len(args) >= 2:
        os.environ[ENV] = args[1]
        args = args[2:]
    elif args and args[0].startswith("--broker="):
        os.environ[ENV] = args[0].split("=", 1)[1]
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if not os.environ.get(ENV):
        print(f"kubecash.shim: {ENV} is not set (or pass --broker ADDRESS)", file=sys.stderr)
        return 2
    install()
    if args[0] == "-m" and len(args) >= 2:
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        return 0
    prog = args[0]
    sys.argv = args
    sys.path.insert(0, os.path.dirname(os.path.abspath(prog)))   # as `python program.py` does
    runpy.run_path(prog, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
