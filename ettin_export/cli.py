"""The `ettin-export` command line: one parser made of the commands' own modules (ettin_export.commands),
and one error policy. An `EttinError` is a refusal the user can act on: printed in one line, exit 2.
Anything else is a bug in ettin-export: shown with its traceback, exit 3. Heavy modules (torch, onnx,
tensorrt) are imported by the command that needs them, so `ettin-export score ARTIFACT` works on a
runtime-only install."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import traceback

from ettin_runtime.errors import EttinError

from ettin_export.commands import COMMANDS

EXIT_REFUSED = 2
EXIT_BUG = 3
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as for any Unix tool whose reader went away (`| head`)
# What the [export] extra installs: a command that needs one of them on a runtime-only install is told so.
EXPORT_MODULES = {"torch", "transformers", "sentence_transformers", "safetensors", "huggingface_hub", "onnx",
                  "onnxscript", "rich"}
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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT), raised by our own handler. A subclass, not KeyboardInterrupt itself: CPython remembers
    a bare KeyboardInterrupt that left code run through PyRun_String (a library can, under our calls) and, under
    `python -m`, ends the process *by* SIGINT (status -2) after we caught it and returned 130. A subclass is never
    taken for that, so the exit status is 130 every time."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that every writer's cleanup runs as for Ctrl-C."""


def _interrupt(signum, frame):
    raise Interrupted()


def _terminate(signum, frame):
    raise Terminated()


def _install_handlers() -> dict:
    """Our SIGINT / SIGTERM handlers (main thread only: Python takes signals there); the previous ones back."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # one a caller set on purpose is kept
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    return previous


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    command = importlib.import_module(COMMANDS[args.command][0])
    previous = _install_handlers()
    try:
        status = command.run(args) or 0
        sys.stdout.flush()  # inside: a reader that went away is seen here, not at the interpreter's exit
        return status
    except BrokenPipeError:
        if not _stdout_gone():
            return _bug(args)  # a pipe of its own broke, not the reader of its output
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no second error when Python flushes
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except EttinError as error:
        print(f"ettin-export {args.command}: error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt as interrupt:
        how = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
        print(f"ettin-export {args.command}: {how}; nothing half-written was kept.", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - not a refusal of ours: a bug, shown as one
        if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in EXPORT_MODULES:
            print(f"ettin-export {args.command}: error: this command needs {error.name}, which is not installed (a "
                  "runtime-only install): pip install torch==2.13.0 && pip install 'ettin-export[export]' (on a GPU "
                  "machine, your CUDA build of torch first).", file=sys.stderr)
            return EXIT_REFUSED
        return _bug(args)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _bug(args) -> int:
    traceback.print_exc()
    print(f"ettin-export {args.command}: internal error (a bug in ettin-export, not in your input): please "
          "report it with the traceback above.", file=sys.stderr)
    return EXIT_BUG


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll reports an error on it)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor (captured), or no poll here
        return False


if __name__ == "__main__":
    sys.exit(main())
