"""One writer per output folder: ``OUTPUT/.loramix.lock`` names the command holding it.

Two ``loramix run`` / ``add-domain`` / ``tune`` / ``demo`` on the same folder would race on its
stage markers and artifact. The second fails at once, naming the holder; a lock left by a process
that died on this host is taken over (with a warning).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK = ".loramix.lock"


class LockedError(RuntimeError):
    """Another loramix command holds the output folder."""


def _holder(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {"pid": data.get("pid"), "host": data.get("host")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def output_lock(output: str | Path, command: str | None = None):
    """Hold ``OUTPUT/.loramix.lock`` for the duration of the block.

    Raises:
        LockedError: another live process (or one on another host) holds it.
    """
    path = Path(output) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command or " ".join(sys.argv),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if _holder(path) == {"pid": me["pid"], "host": me["host"]}:  # held by this process (add-domain runs a run)
        yield path
        return
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                logger.warning("taking over %s: its holder (pid %s) is gone", path, holder.get("pid"))
                path.unlink(missing_ok=True)
                continue
            raise LockedError(
                f"{str(Path(output))!r} is in use by pid {holder.get('pid')} on {holder.get('host')} since "
                f"{holder.get('since')} ({holder.get('command')!r}). Wait for it to finish, use another --output, "
                f"or delete {str(path)!r} if that process is gone."
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield path
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
        except (OSError, ValueError):
            pass
