"""Writing a folder safely: the one writer's transaction of build and deploy, and the checks before it.

    problem = unwritable_problem(out, "--out") or replacement_problem(out, force=..., ours=..., ...)
    staging = StagedFolder(out)      # .OUT.building-<pid>/ beside OUT
    ... write into staging.path ...
    staging.publish()                # or staging.reject() (OUT.rejected) or staging.discard()

A folder is assembled beside its destination and moved into place only when finished, so an existing
good one is never lost to a failed or interrupted run; the hidden work folders a dead process left are
removed by the next writer (`remove_stale_staging`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def unwritable_problem(destination: str | Path, option: str) -> str | None:
    """Why nothing can be written at `destination` (None: it can): its nearest existing folder above is a
    file, read-only or not writable for this user. Checked before any work, so that a long run never ends
    in an OSError where it writes."""
    destination = Path(destination).absolute()
    folder = destination.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return (f"{option} {destination}: {folder} is a file, not a folder, so nothing can be created under it. "
                f"Choose another {option}.")
    if not os.access(folder, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = ("is on a read-only file system" if read_only else
               "is not writable for this user (its permissions, or an immutable attribute: lsattr -d shows it)")
        return f"{option} {destination}: the folder {folder} {why}. Choose another {option}, or make {folder} writable."
    if destination.is_dir() and not os.access(destination, os.W_OK | os.X_OK):  # replaced: moved aside, then removed
        return (f"{option} {destination} cannot be replaced: it is not writable for this user (its permissions, or an "
                f"immutable attribute: lsattr -d shows it). Choose another {option}, or make it writable.")
    return None


def replacement_problem(destination: Path, *, force: bool, ours, option: str, foreign: str, holds: str,
                        keeps: str = "") -> str | None:
    """Why a writer may not replace `destination` (None: it may): a file there, a non-empty folder that
    is not `ours(path)` (ettin-export never deletes folders it did not write), or one of ours without
    --force. `foreign` and `holds` name what the folder is or holds, in the refusal."""
    if not destination.exists():
        return None
    if not destination.is_dir():
        return f"{option} {destination} exists and is not a folder."
    if not any(destination.iterdir()):
        return None
    if not ours(destination):
        return (f"{option} {destination} is a non-empty folder that {foreign}; choose another {option} "
                "(ettin-export never deletes folders it did not write).")
    if not force:
        return f"{option} {destination} already holds {holds}. Pass --force to replace it{keeps}, or choose another {option}."
    return None


class StagedFolder:
    """A folder assembled beside its destination and moved into place only when finished, so that an
    existing good folder is never lost to a failed or interrupted run:

        staging = StagedFolder(out)            # .OUT.building-<pid>/, fresh
        ... write into staging.path ...
        staging.publish()                      # OUT (the old one, if any, replaced), or
        staging.reject()                       # OUT.rejected, OUT untouched, or
        staging.discard()                      # nothing left
    """

    def __init__(self, destination: str | Path, kind: str = "building"):
        self.destination = Path(destination)
        self.path = self.destination.parent / f".{self.destination.name}.{kind}-{os.getpid()}"
        self.removed_stale = remove_stale_staging(self.destination)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def publish(self) -> Path:
        backup = self.destination.parent / f".{self.destination.name}.old-{os.getpid()}"
        if self.destination.exists():
            self.destination.rename(backup)
        self.path.rename(self.destination)
        if backup.exists():
            shutil.rmtree(backup)
        return self.destination

    def reject(self) -> Path:
        rejected = self.destination.parent / f"{self.destination.name}.rejected"
        if rejected.exists():
            shutil.rmtree(rejected)
        self.path.rename(rejected)
        return rejected

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_staging(destination: Path) -> list[Path]:
    """The hidden work folders (.NAME.<kind>-<pid>) that writers of `destination` left when their
    process died (killed, power lost), removed; those of live processes are left alone. A backup of the
    old destination (.NAME.old-<pid>) whose publish never finished is put back instead."""
    removed = []
    for candidate in sorted(destination.parent.glob(f".{destination.name}.*-*")):
        kind, _, pid = candidate.name[len(destination.name) + 2:].rpartition("-")
        if not (candidate.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid))):
            continue
        if kind == "old" and not destination.exists():
            candidate.rename(destination)  # the publish died between its two renames: the old one is back
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed
