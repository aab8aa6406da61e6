"""The command line: normlab train | reproduce | report | bench | search-groups.

One module per command (each with add_parser and its cmd_ function), the options they share in
options.py. Every user error is one line on stderr and exit code 2; an interrupted run exits
with 75 after writing a checkpoint (run the same command again to resume).
"""
from __future__ import annotations

import os
import signal
import sys

from .. import __version__
from ..errors import NormlabError, one_line
from . import bench, reproduce, report, search, train
from .options import Parser


def build_parser() -> Parser:
    parser = Parser(prog="normlab", description="Batch, Layer, Instance and Group Normalization "
                    "studies on CIFAR: train runs, reproduce the GN study, report, benchmark.")
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in (train, reproduce, report, bench, search):
        command.add_parser(sub)
    return parser


def install_signal_handlers() -> dict:
    """SIGINT, SIGTERM and SIGUSR1 (sent by schedulers before preemption): while runs train
    (control.WORKING), they checkpoint at the next step and the command exits with 75, and a
    second signal stops at once; otherwise there is nothing to save and the command ends at
    once (control.Stopped: exit 130, 143, 138). Returns the old handlers."""
    from ..train.control import STOP, WORKING, Stopped

    STOP.clear()

    def handler(signum, frame):
        if not WORKING.is_set():
            raise Stopped(signum)
        if STOP.is_set():  # second signal: stop now
            raise KeyboardInterrupt
        STOP.set()
        print(f"\nnormlab: {signal.Signals(signum).name}: checkpointing after this step; run the "
              f"same command again to resume", file=sys.stderr)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}


class PipeSafe:
    """stdout that survives its reader going away (`normlab ... | head`): the rest of the output
    goes to /dev/null and the work goes on, instead of a BrokenPipeError traceback."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._detach()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._detach()

    def _detach(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    stdout = sys.stdout
    sys.stdout = PipeSafe(stdout)
    try:
        return _main(argv)
    finally:
        sys.stdout.flush()  # a reader gone by now must not cost a traceback at exit either
        sys.stdout = stdout


def _main(argv: list[str] | None) -> int:
    from ..train.control import EXIT_INTERRUPTED, Interrupted, RunBusy, Stopped

    previous = install_signal_handlers()  # first: a signal at any moment ends in one line
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded with benchmark results
        from ..train.ranks import processes
        if processes() > 1 and args.command != "train":
            raise NormlabError(f"only 'normlab train' runs under torchrun (one run on K processes); "
                               f"run 'normlab {args.command}' without torchrun")
        return args.func(args)
    except NormlabError as err:
        print(f"normlab: error: {err}", file=sys.stderr)
        return 2
    except RunBusy as err:
        print(f"normlab: error: {one_line(err)} is being trained by another process; wait for it or "
              f"use another --out", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"normlab: stopped; checkpoint saved in {one_line(err)}; run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Stopped as stop:
        print(f"\nnormlab: {signal.Signals(stop.signum).name}: stopped (nothing was training, and "
              f"nothing is left half-written)", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("normlab: interrupted", file=sys.stderr)
        return 130
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


if __name__ == "__main__":
    sys.exit(main())
