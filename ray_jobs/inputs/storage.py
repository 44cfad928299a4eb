"""Local paths and s3:// URIs behind one small interface, for an object store that fails often.

Object storage is reached through s3fs and configured only by the standard AWS environment
variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), so a local S3
server in the tests and AWS in production take the same code path. Ray Data and Ray Train get the
same s3fs instance wrapped as a pyarrow filesystem, so they retry exactly as the rest does.

Transient failures (503 SlowDown, 500, reset connections, timeouts) are normal at scale and are
retried by the libraries' own machinery, in two layers that see different things: botocore
retries every request (standard mode: exponential backoff with jitter, on throttling, 5xx,
connection errors and timeouts), and s3fs retries a whole call when a response body breaks off
halfway, which botocore cannot see because it has returned by then. Tried against a proxy that
fails a share of requests in all three ways (tests/s3_faults.py), these two cover every
operation here, so nothing is retried by hand.

What is still failing after the retries is classified in one place, `classify`, into a
StorageError whose reason says what went wrong and whose detail names the URI and the AWS
variable to check. Readers turn it into an error row for the clip or unit they were reading (and
must not mark that unit done: the rerun tries again); writers let it stop the job with one line.
Writes stay atomic through any failure: a failed multipart upload is aborted, never completed.

Configuration mistakes (no credentials, unknown bucket, access denied, an endpoint nobody
answers at) are the same errors. `check` finds them in seconds, with a small retry budget, so a
command can refuse to start before it starts Ray; inside a job the full budget applies.
"""

from __future__ import annotations

import contextlib
import copy
import os
import posixpath
import uuid
from typing import BinaryIO, Iterator

import fsspec
import pyarrow.fs as pafs

from groupemotion_core.errors import GroupEmotionError, error_reason

# botocore's budget per request inside a job: 6 attempts, waiting rand(0, 1) * 2**n seconds
# before attempt n + 2 (about 15 s in all on average); AWS_MAX_ATTEMPTS and AWS_RETRY_MODE, the
# standard variables, override it. On top, s3fs tries a call 5 times (its default) when a body
# broke off, a connection was reset, a read timed out or the store said SlowDown: up to 5 x 6
# attempts, so a store that stops answering mid-job is given up after about 8 minutes.
JOB_ATTEMPTS = 6
JOB_TIMEOUTS = {"connect_timeout": 5, "read_timeout": 15}
# `check`'s budget, fixed: a mistake shows within a minute even where the endpoint accepts
# connections and never answers (5 x 6 s + backoff), while one throttled or dropped request
# out of several is still ridden through. No s3fs tries on top.
CHECK_CONFIG = {"retries": {"total_max_attempts": 5, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 6}
# Parts of a streamed upload: each is held in memory once and, on a flaky store, sent again
# whole, so they are kept small; S3's limit of 10,000 parts puts the largest object at 160 GiB.
PART_BYTES = 16 << 20


class StorageError(GroupEmotionError):
    """The object store failed or refused, after retries (see `classify` for the reasons).

    Not a fault of the media: a unit that failed with one must be tried again by a rerun.
    """

    REASONS = ("storage_unavailable", "unreachable", "no_credentials", "bad_credentials",
               "access_denied", "no_such_bucket", "wrong_region", "bad_endpoint", "storage_error")


def is_storage_failure(error: str | None) -> bool:
    """Whether a row's `error` (`<reason>: <detail>`) comes from a StorageError: that unit is
    not done, and a rerun must try it again."""
    return bool(error) and error_reason(error) in StorageError.REASONS


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it (no scheme).

    A caller that uses the filesystem directly wraps those calls in `classified(uri)`."""
    if uri.startswith("s3://"):
        return _s3(_job_config()), uri[len("s3://") :].rstrip("/")
    if is_remote(uri) and not uri.startswith("file://"):
        raise GroupEmotionError("bad_uri", f"{uri}: only local paths and s3:// URIs are supported")
    fs = fsspec.filesystem("file")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return fs, os.path.abspath(os.path.expanduser(path))


def _s3(config: dict):
    import s3fs

    # The endpoint and the config are constructor arguments, so fsspec's instance cache never
    # hands back a filesystem bound to another endpoint or budget, and they travel with the
    # instance when Ray pickles it to a worker.
    # botocore edits the retries dict it is given: each instance gets its own copy.
    return s3fs.S3FileSystem(endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                             config_kwargs=copy.deepcopy(config))


def _job_config() -> dict:
    retries = {}
    if not os.environ.get("AWS_RETRY_MODE"):
        retries["mode"] = "standard"
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["total_max_attempts"] = JOB_ATTEMPTS
    return {"retries": retries, **JOB_TIMEOUTS}


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The same filesystem as `filesystem(uri)` (the same retries), wrapped for pyarrow and Ray."""
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


def check(uri: str, *, write: bool = False) -> None:
    """Raise the StorageError a job would meet at `uri`, in seconds rather than after a job's
    retries: list one key under it and, with `write`, put and delete a hidden probe object there
    (so read-only credentials are found before a job has done any work). Local paths pass."""
    if not uri.startswith("s3://"):
        return
    fs = _s3(CHECK_CONFIG)
    fs.retries = 1  # an instance of its own (its config differs): botocore's attempts only
    bucket, _, key = uri[len("s3://") :].rstrip("/").partition("/")
    if not bucket:
        raise GroupEmotionError("bad_uri", f"{uri}: no bucket name")
    with classified(uri, "writing" if write else "reading"):
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
        if write:
            probe = posixpath.join(key, f".groupemotion-write-check-{uuid.uuid4().hex}")
            fs.call_s3("put_object", Bucket=bucket, Key=probe, Body=b"")
            fs.call_s3("delete_object", Bucket=bucket, Key=probe)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        with classified(uri):
            fs.info(path)  # not fs.exists, which answers False for a bucket that is not there
        return True
    except FileNotFoundError:  # the object: a missing bucket left as a StorageError
        return False


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """Read a whole object; refuse objects larger than `max_bytes` before reading them."""
    fs, path = filesystem(uri)
    try:
        with classified(uri):
            if max_bytes is not None and fs.size(path) > max_bytes:
                raise GroupEmotionError("too_large", f"{uri} is larger than {max_bytes} bytes")
            return fs.cat_file(path)
    except FileNotFoundError:
        raise GroupEmotionError("not_found", f"{uri} does not exist") from None


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[BinaryIO]:
    """Stream an object (a shard) without holding it in memory; errors of the store, also those
    met while reading inside the block, leave as StorageError."""
    fs, path = filesystem(uri)
    try:
        with classified(uri):
            f = fs.open(path, "rb")
    except FileNotFoundError:
        raise GroupEmotionError("not_found", f"{uri} does not exist") from None
    with classified(uri), f:
        yield f


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write an object so that readers see either nothing or the whole of it.

    An S3 PUT is atomic already; on a local disk the bytes go to a temporary name beside the
    target and are renamed into place.
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        with classified(uri, "writing"):
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
    with classified(uri):
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
        with classified(f"s3://{key}"):
            fs.get_file(key, target)
    return local_dir


def find(uri: str) -> list[tuple[str, int]]:
    """The objects a URI names, as sorted (uri, size) pairs: a folder or prefix (recursively),
    a glob (`*`, `?`, `[`), or one object. Returned URIs keep the caller's scheme, so they can
    be passed back to any function here (and name rows in a stable way)."""
    fs, path = filesystem(uri)
    try:
        with classified(uri):
            if any(c in path for c in "*?["):
                found = fs.glob(path, detail=True)
            else:
                info = fs.info(path)
                found = fs.find(path, detail=True) if info["type"] == "directory" else {path: info}
    except FileNotFoundError:
        raise GroupEmotionError("not_found", f"{uri} does not exist") from None
    scheme = "s3://" if uri.startswith("s3://") else ""
    return sorted(
        (scheme + name, int(info.get("size") or 0))
        for name, info in found.items()
        if info.get("type") != "directory"
    )


def remove(uri: str) -> None:
    """Delete one object or file (missing is fine)."""
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError), classified(uri, "writing"):
        fs.rm_file(path)


@contextlib.contextmanager
def open_write_atomic(uri: str) -> Iterator[BinaryIO]:
    """Stream an object of any size so that readers see either nothing or the whole of it.

    The streaming twin of `write_bytes_atomic`, for objects that should not be held in memory:
    on S3 the bytes go up as a multipart upload that is completed only when the block exits
    cleanly and aborted otherwise (fsspec's transaction protocol: autocommit=False, then
    commit() or discard()); on a local disk they go to a temporary name that is renamed into
    place or deleted. A part that fails after the retries fails every later write too, so that
    code which writes on its way out (tarfile's close) cannot hide the first error behind
    another.
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        with classified(uri, "writing"):
            f = fs.open(path, "wb", autocommit=False, block_size=PART_BYTES)
            upload = _Upload(f, uri)
            try:
                yield upload
                f.close()
                f.commit()
            except BaseException:
                _abort(f)
                raise
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


class _Upload:
    """The write end of a multipart upload whose first failure is final."""

    def __init__(self, f, uri: str):
        self._f = f
        self._uri = uri
        self._failed: Exception | None = None

    def write(self, data) -> int:
        if self._failed is not None:
            raise self._failed
        try:
            with classified(self._uri, "writing"):
                return self._f.write(data)
        except Exception as e:
            self._failed = e
            raise

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        pass  # parts go up as they fill; the last one when the upload completes


def _abort(f) -> None:
    """Abort a multipart upload without sending its last part. Aborting is best effort: when the
    store is down it fails too, and the parts stay invisible until a bucket lifecycle rule
    (AbortIncompleteMultipartUpload) removes them."""
    f.closed = True  # never flush: close() would try to upload the rest
    with contextlib.suppress(Exception):
        f.discard()


@contextlib.contextmanager
def classified(uri: str, action: str = "reading") -> Iterator[None]:
    """Failures of the store inside the block leave as a StorageError naming `uri`; anything
    else leaves as it came: bad media, a bug, and a missing object (FileNotFoundError, which
    s3fs also raises for a missing bucket: that one becomes a StorageError)."""
    try:
        yield
    except Exception as e:
        error = classify(e, uri, action)
        if error is None:
            raise
        raise error from e


def classify(exc: BaseException, uri: str, action: str = "reading") -> StorageError | None:
    """The StorageError behind `exc` (raised while `action` `uri`), or None when the store is not
    to blame. The one place that reads botocore's, s3fs's and aiohttp's exceptions: s3fs turns
    S3 error codes into OSErrors and keeps the original as the cause, so the chain is searched."""
    if isinstance(exc, GroupEmotionError):
        return None
    import aiohttp
    import botocore.exceptions as bx
    from botocore.parsers import ResponseParserError

    for e in _chain(exc):
        if isinstance(e, bx.ClientError):
            return _from_response(e, uri, action)
        if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
            return StorageError("no_credentials", f"{uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID "
                                "and AWS_SECRET_ACCESS_KEY (or use an IAM role)")
        if isinstance(e, bx.ConnectionError):  # refused, connect timeout, TLS, proxy
            return StorageError("unreachable", f"{uri}: cannot connect to {_store()}; check AWS_ENDPOINT_URL "
                                "and the network")
        if isinstance(e, bx.ReadTimeoutError):
            return StorageError("unreachable", f"{uri}: no answer from {_store()} after retries; check "
                                "AWS_ENDPOINT_URL and the network")
        if isinstance(e, (bx.HTTPClientError, bx.IncompleteReadError, ResponseParserError, aiohttp.ClientError,
                          ConnectionError, TimeoutError)):
            return _unavailable(uri, type(e).__name__)
        if isinstance(e, ValueError) and "Invalid endpoint" in str(e):
            return StorageError("bad_endpoint", f"{uri}: AWS_ENDPOINT_URL={os.environ.get('AWS_ENDPOINT_URL')!r} "
                                "is not a URL; set it like http://host:9000, or unset it for AWS S3")
    return None


# S3 error codes (and bare HTTP statuses, which is all a HEAD answer has) -> reason.
_CODES = {
    "NoSuchBucket": "no_such_bucket",
    **dict.fromkeys(("AccessDenied", "AllAccessDisabled", "AccountProblem", "403"), "access_denied"),
    **dict.fromkeys(("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired"), "bad_credentials"),
    **dict.fromkeys(("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException",
                     "301"), "wrong_region"),
}
_WHAT_TO_CHECK = {
    "access_denied": "access denied {action} it; check what the credentials (AWS_ACCESS_KEY_ID, or the IAM "
                     "role) may do in this bucket",
    "bad_credentials": "the store refused the credentials ({code}); check AWS_ACCESS_KEY_ID, "
                       "AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN",
    "wrong_region": "the bucket is in another region ({code}); set AWS_REGION to the bucket's region",
}


def _from_response(e, uri: str, action: str) -> StorageError | None:
    error = e.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in ("NoSuchKey", "NotFound", "404"):
        return None  # a missing object: the caller's not_found
    reason = _CODES.get(code)
    if reason == "no_such_bucket":
        bucket = uri[len("s3://") :].split("/", 1)[0]
        return StorageError(reason, f"{uri}: no bucket {bucket!r} at {_store()}; check the URI, "
                            "AWS_ENDPOINT_URL and AWS_REGION")
    if reason is not None:
        return StorageError(reason, f"{uri}: " + _WHAT_TO_CHECK[reason].format(action=action, code=code))
    if status >= 500 or code in ("SlowDown", "RequestTimeout"):
        return _unavailable(uri, code or str(status))
    return StorageError("storage_error", f"{uri}: {code or status}: {error.get('Message', '')}")


def _unavailable(uri: str, what: str) -> StorageError:
    return StorageError("storage_unavailable", f"{uri}: {_store()} kept failing after retries ({what}); "
                        "try again later")


def _store() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return f"{endpoint} (AWS_ENDPOINT_URL)" if endpoint else "AWS S3 (AWS_ENDPOINT_URL unset)"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _temporary_name(path: str) -> str:
    """A hidden name beside `path`: dataset readers (pyarrow, pandas, Ray Data) skip names that
    start with '.', so a write cut short never looks like part of the dataset."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex}")
