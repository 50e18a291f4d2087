"""Progress for long work: one line per step with its duration, a spinner while it runs (on a terminal).
Everything goes to stderr so stdout stays machine-readable."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator


class Steps:
    def __init__(self, title: str, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, quiet=quiet, highlight=False, soft_wrap=True)
        self.title = title
        self.started = time.perf_counter()
        self.console.print(f"[bold]{title}[/bold]")

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        start = time.perf_counter()
        status = self.console.status(description) if self.console.is_terminal else contextlib.nullcontext()
        try:
            with status:
                yield
        except BaseException:
            self.console.print(f"  [red]✗[/red] {description} ({time.perf_counter() - start:.1f} s)")
            raise
        self.console.print(f"  [green]✓[/green] {description} ({time.perf_counter() - start:.1f} s)")

    def note(self, text: str) -> None:
        self.console.print(f"    {text}")

    def done(self, text: str) -> None:
        self.console.print(f"[bold]{text}[/bold] ({time.perf_counter() - self.started:.1f} s in all)")


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
