"""The `ettin-export` command line: one parser made of the commands' own modules (ettin_export.commands),
and one error policy. An `EttinError` is a refusal the user can act on: printed in one line, exit 2.
Anything else is a bug in ettin-export: shown with its traceback, exit 3. Heavy modules (torch, onnx,
tensorrt) are imported by the command that needs them, so `ettin-export score ARTIFACT` works on a
runtime-only install."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import traceback

from ettin_runtime.errors import EttinError

from ettin_export.commands import COMMANDS

EXIT_REFUSED = 2
EXIT_BUG = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ettin-export",
        description="Export ModernBERT (Ettin) rerankers to packed, parity-checked ONNX / TensorRT artifacts.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        importlib.import_module(module_name).add_arguments(commands.add_parser(name, help=help_text))
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that every writer's cleanup runs as for Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    command = importlib.import_module(COMMANDS[args.command][0])
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        return command.run(args) or 0
    except EttinError as error:
        print(f"ettin-export {args.command}: error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt as interrupt:
        how = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
        print(f"ettin-export {args.command}: {how}; nothing half-written was kept.", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - not a refusal of ours: a bug, shown as one
        traceback.print_exc()
        print(f"ettin-export {args.command}: internal error (a bug in ettin-export, not in your input): please "
              "report it with the traceback above.", file=sys.stderr)
        return EXIT_BUG
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
