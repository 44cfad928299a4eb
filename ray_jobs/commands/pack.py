"""Pack a folder of labelled videos into WebDataset-style tar shards, locally or on s3://.

  groupemotion pack SRC DEST [--labels CSV] [--shard-size N]

SRC is a folder or URI holding videos (mp4, mkv, webm, mov, avi), searched recursively. Labels
come from --labels, a CSV in the VGAF layout (one row per clip: video name, with or without
extension, then class; comma or whitespace separated; a header row is allowed), the class given
as a name (any case) or as a VGAF number: 1 = Positive, 2 = Neutral, 3 = Negative. Without a CSV,
a video in a class-named folder (Negative/, Neutral/, Positive/) has that class and any other
video has no label (fine for inference, not for training). With a CSV, every video must be in it
and every name in it must be a video under SRC.

DEST receives shard-000000.tar, shard-000001.tar, ... with N clips each (the last one fewer):
members <key>.<ext> (the video's bytes) and <key>.json ({"label": class or null}); <key> is the
video's path under SRC without its extension, dots turned into underscores (a WebDataset key ends
at the first dot). Then manifest.json: the shards with their clips, bytes, sha256 and clips per
class, and the totals. The manifest is written last, so it exists only for a finished pack.

Same input, same bytes: videos go in sorted order, tar headers carry fixed times, owners and
modes, and the JSON is canonical. Videos are read READERS at a time (an object store answers one
request in tens of milliseconds, so one at a time would take days for a million objects), in
order, with at most READ_AHEAD_BYTES of them held beyond the one being written: memory holds the
list of names and that window. Each shard is streamed to DEST, where it appears whole or not at all. A shard-NNNNNN.tar in DEST that the new
manifest does not list (left by an earlier, larger pack) is deleted. Progress: one line per shard
on stderr.

On S3 every read and write is retried through throttling and dropped connections (see
ray_jobs.inputs.storage); a failure that outlasts the retries stops the pack with one line, and since an
earlier manifest in DEST is deleted before the first shard is written, DEST then has no manifest:
run the pack again.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import posixpath
import sys
import tarfile
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Iterator, TextIO

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.decode import DecodeSpec
from groupemotion_core.schema import CLASSES, parse_label
from ray_jobs.inputs import storage
from ray_jobs.inputs.sources import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    folder_label,
    layout,
    read_labels_csv,
    video_stem,
)

DEFAULT_SHARD_SIZE = 1000
SHARD_NAME = "shard-{:06d}.tar"
READERS = 16
READ_AHEAD_BYTES = 256 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="folder or URI of videos (searched recursively)")
    parser.add_argument("dest", metavar="DEST", help="folder or s3:// prefix for the shards")
    parser.add_argument("--labels", metavar="CSV", help="labels CSV (VGAF layout; see above)")
    parser.add_argument(
        "--shard-size", metavar="N", type=int, default=DEFAULT_SHARD_SIZE,
        help=f"clips per shard (default {DEFAULT_SHARD_SIZE})",
    )


def run(args: argparse.Namespace) -> int:
    manifest = pack(args.src, args.dest, labels_csv=args.labels, shard_size=args.shard_size)
    summary = {k: manifest[k] for k in ("clips", "classes", "unlabelled")}
    print(json.dumps({"dest": args.dest, "shards": len(manifest["shards"]), **summary}))
    return 0


@dataclass(frozen=True)
class _Clip:
    uri: str
    key: str
    ext: str
    label: str | None
    size: int


def pack(
    src: str,
    dest: str,
    *,
    labels_csv: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: TextIO = sys.stderr,
) -> dict:
    """Write the shards and manifest of `src` to `dest`; return the manifest."""
    if shard_size < 1:
        raise GroupEmotionError("bad_argument", f"--shard-size must be at least 1, not {shard_size}")
    clips = _clips(src, labels_csv)
    # A manifest left by an earlier pack would vouch for shards about to be replaced.
    storage.remove(storage.join(dest, MANIFEST_NAME))
    shards = []
    for start in range(0, len(clips), shard_size):
        name = SHARD_NAME.format(len(shards))
        shards.append(_write_shard(storage.join(dest, name), name, clips[start : start + shard_size]))
        shard = shards[-1]
        done = start + shard["clips"]
        print(f"{name}: {shard['clips']} clips, {shard['bytes']} bytes ({done}/{len(clips)} clips)",
              file=progress, flush=True)
    _remove_stale_shards(dest, {s["name"] for s in shards}, progress)
    classes = Counter(c.label for c in clips if c.label is not None)
    manifest = {
        "format": MANIFEST_FORMAT,
        "clips": len(clips),
        "classes": {c: classes.get(c, 0) for c in CLASSES},
        "unlabelled": sum(c.label is None for c in clips),
        "shards": shards,
    }
    storage.write_bytes_atomic(storage.join(dest, MANIFEST_NAME), _canonical_json(manifest))
    return manifest


def _clips(src: str, labels_csv: str | None) -> list[_Clip]:
    """The videos under `src` in sorted order with their keys and labels; every mistake found
    here, before a byte is written."""
    root = storage.filesystem(src)[1]
    videos = [(uri, size) for uri, size in storage.find(src) if layout(uri) == "video"]
    if not videos:
        raise GroupEmotionError("not_found", f"no videos under {src}")
    labels = _strict_labels(labels_csv) if labels_csv else None
    clips: list[_Clip] = []
    keys: dict[str, str] = {}
    for uri, size in videos:
        path = storage.filesystem(uri)[1]
        rel = path[len(root) + 1 :] if path.startswith(root + "/") else posixpath.basename(path)
        stem, ext = posixpath.splitext(rel)
        key = posixpath.join(posixpath.dirname(stem), posixpath.basename(stem).replace(".", "_"))
        if key in keys:
            raise GroupEmotionError("duplicate_key", f"{keys[key]} and {uri} both pack as {key}")
        keys[key] = uri
        if labels is None:
            label = folder_label(uri)
        elif video_stem(uri) in labels:
            label = labels[video_stem(uri)]
        else:
            raise GroupEmotionError("unlabelled", f"{uri} is not in {labels_csv}")
        clips.append(_Clip(uri, key, ext.lstrip(".").lower(), label, size))
    if labels is not None:
        missing = sorted(set(labels) - {video_stem(c.uri) for c in clips})
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise GroupEmotionError("missing_video", f"{labels_csv} names videos not under {src}: {shown}")
    return sorted(clips, key=lambda c: c.key)


def _strict_labels(labels_csv: str) -> dict[str, str]:
    labels = {}
    for name, value in read_labels_csv(labels_csv).items():
        try:
            labels[name] = parse_label(value)
        except ValueError as e:
            raise GroupEmotionError("bad_label", f"{labels_csv}: {name}: {e}") from None
    return labels


class _Hashing:
    """A write-only stream that counts and hashes what passes through it to `target`."""

    def __init__(self, target: BinaryIO):
        self._target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._target.write(data)


def _write_shard(uri: str, name: str, clips: list[_Clip]) -> dict:
    with storage.open_write_atomic(uri) as out:
        hashing = _Hashing(out)
        with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for clip, data in _read_ahead(clips):
                _add(tar, f"{clip.key}.{clip.ext}", data)
                _add(tar, f"{clip.key}.json", _canonical_json({"label": clip.label}))
    classes = Counter(c.label for c in clips if c.label is not None)
    return {
        "name": name,
        "clips": len(clips),
        "bytes": hashing.size,
        "sha256": hashing.sha256.hexdigest(),
        "classes": {c: classes.get(c, 0) for c in CLASSES},
    }


def _read_ahead(clips: list[_Clip]) -> Iterator[tuple[_Clip, bytes]]:
    """The clips with their bytes, in order, read READERS at a time: a read starts while the ones
    in flight hold less than READ_AHEAD_BYTES (by their listed sizes), or when none is in flight."""
    limit = DecodeSpec().max_input_bytes
    pending: deque = deque()
    held = 0
    with ThreadPoolExecutor(READERS) as pool:
        for clip in clips:
            while pending and (len(pending) >= READERS or held + clip.size > READ_AHEAD_BYTES):
                done, future = pending.popleft()
                held -= done.size
                yield done, future.result()
            pending.append((clip, pool.submit(storage.read_bytes, clip.uri, limit)))
            held += clip.size
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A member whose header depends only on its name and size."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _canonical_json(value) -> bytes:
    return (json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n").encode()


def _remove_stale_shards(dest: str, keep: set[str], progress: TextIO) -> None:
    for uri, _ in storage.find(storage.join(dest, "shard-*.tar")):
        name = posixpath.basename(uri)
        if name not in keep and _is_shard_name(name):
            storage.remove(uri)
            print(f"removed stale {name}", file=progress, flush=True)


def _is_shard_name(name: str) -> bool:
    digits = name[len("shard-") : -len(".tar")]
    return name.startswith("shard-") and name.endswith(".tar") and len(digits) == 6 and digits.isdigit()


if __name__ == "__main__":
    from ray_jobs.cli import entrypoint

    entrypoint("pack")
