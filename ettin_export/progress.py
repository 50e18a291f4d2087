"""Progress for long work: `Steps`, one line per step with its duration and a spinner while it runs (on a
terminal; everything goes to stderr so stdout stays machine-readable), and `JsonReport`, steps recorded
in a JSON file rewritten after each one (the GPU scripts: whatever ran is kept if the machine goes)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path


class Steps:
    LOG_EVERY_S = 60.0

    def __init__(self, title: str, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, quiet=quiet, highlight=False, soft_wrap=True)
        self.title = title
        self.started = time.perf_counter()
        self.console.print(f"[bold]{title}[/bold]")

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[Callable[[str], None]]:
        """A step; it yields `update(text)`, how far a long step has got: beside its spinner on a terminal,
        in a log (no terminal) a line at most every LOG_EVERY_S seconds."""
        start = time.perf_counter()
        terminal = self.console.is_terminal
        status = self.console.status(description) if terminal else contextlib.nullcontext()
        logged = [start]

        def update(text: str) -> None:
            if terminal:
                status.update(f"{description}: {text}")
            elif time.perf_counter() - logged[0] >= self.LOG_EVERY_S:
                logged[0] = time.perf_counter()
                self.console.print(f"    … {text}")

        try:
            with status:
                yield update
        except BaseException:
            self.console.print(f"  [red]✗[/red] {description} ({time.perf_counter() - start:.1f} s)")
            raise
        self.console.print(f"  [green]✓[/green] {description} ({time.perf_counter() - start:.1f} s)")

    def note(self, text: str) -> None:
        self.console.print(f"    {text}")

    @staticmethod
    def eta(done: int, total: int, spent_s: float) -> str:
        """'3/28, about 4 min left' from the time the first `done` of `total` items took."""
        left = spent_s / max(done, 1) * (total - done)
        return f"{done}/{total}, about {left / 60:.0f} min left" if left >= 90 else f"{done}/{total}, about {left:.0f} s left"

    def done(self, text: str) -> None:
        self.console.print(f"[bold]{text}[/bold] ({time.perf_counter() - self.started:.1f} s in all)")


def quiet_third_party() -> None:
    """transformers' and huggingface_hub's own progress bars and info logs off: a command shows its own
    progress (Steps), one line per step, and nothing else on the terminal."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


class JsonReport:
    """A JSON result of named steps, rewritten (atomically) after every step. A step that raises is
    recorded with its error and traceback and does not stop the next; a step may set `ok_override`
    in its entry to report a failed check without raising."""

    def __init__(self, path: str | Path, budget_s: float | None = None):
        self.path, self.budget_s, self.t0 = Path(path), budget_s, time.time()
        self.budget_t0 = self.t0
        self.data: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": {}}

    def elapsed(self) -> float:
        return time.time() - self.t0

    def start_budget(self) -> None:
        """Count the time budget from now (after the imports, which are not the steps' time)."""
        self.budget_t0 = time.time()
        self.data["budget_started_after_s"] = round(self.budget_t0 - self.t0, 2)

    def remaining(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - (time.time() - self.budget_t0)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict]:
        entry: dict = {"ok": False}
        self.data["steps"][name] = entry
        start = time.time()
        try:
            yield entry
            entry["ok"] = entry.pop("ok_override", True)
        except Exception as exc:  # noqa: BLE001 - one failed step must not stop the others
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc(limit=10)
        finally:
            entry["seconds"] = round(time.time() - start, 3)
            self.write()

    def skip(self, name: str, reason: str) -> None:
        self.data["steps"][name] = {"ok": None, "skipped": reason}
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)
