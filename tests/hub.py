"""A Hugging Face cache that a test lays out itself (the `hub_cache` fixture makes it, offline):
what `hf download` leaves on a machine, refs/<revision> -> snapshots/<commit>/..., so that hub ids
resolve without the network and a download attempt is an error."""

from __future__ import annotations

from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_snapshot(cache: Path, repo: str, revision: str | None, commit: str = COMMIT) -> Path:
    """The cache layout of huggingface_hub: a ref file naming a commit, the commit's files."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    if revision is not None:
        ref = root / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    return snapshot
