"""Local paths and s3:// URIs behind one small interface.

Object storage is reached through s3fs and configured only by the standard AWS environment
variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), so a local S3
server in the tests and AWS in production take the same code path. Ray Data gets the same s3fs
instance wrapped as a pyarrow filesystem.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from typing import BinaryIO, Iterator

import fsspec
import pyarrow.fs as pafs

from groupemotion_core.errors import GroupEmotionError


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it (no scheme)."""
    if uri.startswith("s3://"):
        import s3fs

        # The endpoint is part of the constructor arguments so fsspec's instance cache never
        # hands back a filesystem bound to another endpoint.
        fs = s3fs.S3FileSystem(endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
        return fs, uri[len("s3://") :].rstrip("/")
    if is_remote(uri) and not uri.startswith("file://"):
        raise GroupEmotionError("bad_uri", f"{uri}: only local paths and s3:// URIs are supported")
    fs = fsspec.filesystem("file")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return fs, os.path.abspath(os.path.expanduser(path))


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The same filesystem as `filesystem(uri)`, wrapped for pyarrow and Ray Data."""
    fs, path = filesystem(uri)
    if uri.startswith("s3://"):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """Read a whole object; refuse objects larger than `max_bytes` before reading them."""
    fs, path = filesystem(uri)
    try:
        if max_bytes is not None and fs.size(path) > max_bytes:
            raise GroupEmotionError("too_large", f"{uri} is larger than {max_bytes} bytes")
        return fs.cat_file(path)
    except FileNotFoundError:
        raise GroupEmotionError("not_found", f"{uri} does not exist") from None


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write an object so that readers see either nothing or the whole of it.

    An S3 PUT is atomic already; on a local disk the bytes go to a temporary name beside the
    target and are renamed into place.
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _temporary_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy every file under `local_dir` to `uri` (a local path or s3:// prefix), files atomically."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local_dir)
            with open(os.path.join(root, name), "rb") as f:
                write_bytes_atomic(join(uri, *rel.split(os.sep)), f.read())


def download_dir(uri: str, local_dir: str) -> str:
    """Copy the objects under `uri` into `local_dir` and return it (a local `uri` is returned as is)."""
    if not is_remote(uri):
        path = filesystem(uri)[1]
        if not os.path.isdir(path):
            raise GroupEmotionError("not_found", f"{uri} is not a directory")
        return path
    fs, path = filesystem(uri)
    found = fs.find(path)
    if not found:
        raise GroupEmotionError("not_found", f"nothing under {uri}")
    os.makedirs(local_dir, exist_ok=True)
    for key in found:
        rel = posixpath.relpath(key, path)
        if rel.startswith("..") or posixpath.isabs(rel):
            continue
        target = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(key, target)
    return local_dir


def find(uri: str) -> list[tuple[str, int]]:
    """The objects a URI names, as sorted (uri, size) pairs: a folder or prefix (recursively),
    a glob (`*`, `?`, `[`), or one object. Returned URIs keep the caller's scheme, so they can
    be passed back to any function here (and name rows in a stable way)."""
    fs, path = filesystem(uri)
    if any(c in path for c in "*?["):
        found = fs.glob(path, detail=True)
    else:
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise GroupEmotionError("not_found", f"{uri} does not exist") from None
        found = fs.find(path, detail=True) if info["type"] == "directory" else {path: info}
    scheme = "s3://" if uri.startswith("s3://") else ""
    return sorted(
        (scheme + name, int(info.get("size") or 0))
        for name, info in found.items()
        if info.get("type") != "directory"
    )


def remove(uri: str) -> None:
    """Delete one object or file (missing is fine)."""
    fs, path = filesystem(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def open_write_atomic(uri: str) -> Iterator[BinaryIO]:
    """Stream an object of any size so that readers see either nothing or the whole of it.

    The streaming twin of `write_bytes_atomic`, for objects that should not be held in memory:
    on S3 the bytes go up as a multipart upload that is completed only when the block exits
    cleanly and aborted otherwise (fsspec's transaction protocol: autocommit=False, then
    commit() or discard()); on a local disk they go to a temporary name that is renamed into
    place or deleted.
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        f = fs.open(path, "wb", autocommit=False)
        try:
            yield f
            f.close()
        except BaseException:
            f.close()
            f.discard()
            raise
        f.commit()
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _temporary_name(path: str) -> str:
    """A hidden name beside `path`: dataset readers (pyarrow, pandas, Ray Data) skip names that
    start with '.', so a write cut short never looks like part of the dataset."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex}")

