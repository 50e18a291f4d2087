"""`ettin-export triton-server setup | start | status | stop`: a real Triton Inference Server (python
backend only) on a CPU-only Linux box, from the `nvidia-pytriton` wheel (ettin_export.serving:
triton_env.py builds its environment, triton_server.py starts it, processes.py stops it).

    ettin-export triton-server setup  [--env DIR] [--python PY] [--force]
    ettin-export triton-server start  --repo MODEL_REPOSITORY [--env DIR] [--http-port N ...]
                                      [--log FILE] [--state FILE] [--timeout S]
    ettin-export triton-server status --state FILE | --pid PID
    ettin-export triton-server stop   --state FILE | --pid PID [--grace S]

Each prints JSON. `start` leaves the server running and writes a state file for `status` and `stop`.
Exit status: 0; 1 when `stop` could not end the server; 3 when `status` finds it not running; 2 for a
refusal (an env that cannot be built, a server that did not start, an unreadable state file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ettin_export.serving.triton_env import DEFAULT_ENV_DIR, ENV_VAR

    sub = parser.add_subparsers(dest="server_command", required=True, metavar="ACTION")
    env_help = f"server env directory (default: ${ENV_VAR} or {DEFAULT_ENV_DIR})"

    setup = sub.add_parser("setup", help="create or reuse the server environment")
    setup.add_argument("--env", help=env_help)
    setup.add_argument("--python", help="base interpreter with a shared libpython (default: the running one's base)")
    setup.add_argument("--force", action="store_true", help="rebuild even when complete")
    setup.set_defaults(action=_setup)

    start = sub.add_parser("start", help="start a server in the background; prints its ports as JSON")
    start.add_argument("--repo", required=True, help="model repository")
    start.add_argument("--env", help=env_help)
    for proto in ("http", "grpc", "metrics"):
        start.add_argument(f"--{proto}-port", type=int, help="default: a free port")
    start.add_argument("--log", help="server log (default: <env>/runs/triton-<time>-<id>.log)")
    start.add_argument("--state", help="state file (default: next to the log, .state.json)")
    start.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness")
    start.add_argument("--log-verbose", type=int, default=0)
    start.add_argument("--allow-unavailable", action="store_true", help="start even if some models fail to load")
    start.add_argument("--server-arg", action="append", default=[],
                       help="extra tritonserver flag (repeatable), e.g. --server-arg=--model-load-thread-count=2")
    start.set_defaults(action=_start)

    for name, action, text in (("stop", _stop, "stop a server"), ("status", _status, "show a server")):
        command = sub.add_parser(name, help=text)
        target = command.add_mutually_exclusive_group(required=True)
        target.add_argument("--state", help="the state file that `start` wrote")
        target.add_argument("--pid", type=int, help="a tritonserver pid (no pid-reuse check)")
        if name == "stop":
            command.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")
        command.set_defaults(action=action)


def run(args) -> int:
    return args.action(args)


def main(argv: list[str] | None = None) -> int:
    """The command on its own (scripts/triton_server.py): `ettin-export triton-server ARGV`."""
    from ettin_export.cli import main as cli

    return cli(["triton-server", *(sys.argv[1:] if argv is None else argv)])


def _print(data: dict) -> None:
    print(json.dumps(data, indent=2))


def _setup(args) -> int:
    from ettin_export.serving.triton_env import ensure_env

    started = time.perf_counter()
    env = ensure_env(args.env, python=args.python, force=args.force, quiet=False)
    _print({**env.to_json(), "seconds": round(time.perf_counter() - started, 2)})
    return 0


def _start(args) -> int:
    from ettin_export.serving.triton_env import ensure_env
    from ettin_export.serving.triton_server import start_server

    env = ensure_env(args.env, quiet=False)
    handle = start_server(args.repo, env, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_path=args.log, state_path=args.state,
                          timeout=args.timeout, log_verbose=args.log_verbose, extra_args=args.server_arg,
                          require_models_ready=not args.allow_unavailable, quiet=False)
    handle.detach()  # the server outlives this command; `stop --state` ends it
    _print(handle.to_json())
    return 0


def _stop(args) -> int:
    from ettin_export.serving.processes import stop_server
    from ettin_export.serving.triton_server import ServerHandle

    if args.state:
        report = ServerHandle.from_state(args.state).stop(grace=args.grace)
    else:
        report = stop_server(args.pid, grace=args.grace)
    _print(report)
    return 0 if report["exited"] else 1


def _status(args) -> int:
    from ettin_export.serving import processes
    from ettin_export.serving.triton_server import ServerHandle

    if args.state:
        handle = ServerHandle.from_state(args.state)
        status = {**handle.to_json(), "alive": handle.is_alive(), "ready": False}
        if status["alive"] and handle.is_ready():
            status.update(ready=True, models=handle.models())
    else:
        status = {"pid": args.pid, "alive": processes.is_alive(args.pid),
                  "children": sorted(processes.descendants(args.pid))}
    _print(status)
    return 0 if status["alive"] else 3
