"""Finding the processes a test started, by what their command lines name (Linux /proc): a test
stops only its own Ray processes, never another user's."""

from __future__ import annotations

from pathlib import Path


def pids_naming(text: str) -> list[int]:
    """Processes whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids
