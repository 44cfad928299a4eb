"""A flaky object store on demand: an HTTP proxy on 127.0.0.1 in front of the test's S3 server.

Real object stores throttle (503 SlowDown), drop connections and cut responses short, and the
jobs must ride through all of it. Mocking the S3 client would test our idea of those failures;
this proxy makes the real client (botocore, aiohttp) meet them on the wire. It forwards every
request to the upstream server and answers a share of them with a fault instead: exactly
`failure_rate` of every 20 requests, at seeded positions, the kinds taken in turn, so that even
a short run meets every kind and a rerun meets the same faults:

- `slowdown`: 503 with S3's own XML error body, as S3 sends when throttling;
- `drop`: the connection is reset before any answer (the request never reaches upstream);
- `truncate`: upstream's answer, its headers promising the whole body, cut off halfway.

`scope` narrows the faults to requests whose `METHOD /path?query` contains it (`"partNumber="`:
only multipart parts fail). `deny` makes every request to the named buckets answer 403
AccessDenied, as a bucket policy would: the one storage mistake a local S3 server does not
enforce by itself.
"""

from __future__ import annotations

import http.client
import http.server
import random
import socket
import struct
import threading
from collections import Counter
from urllib.parse import urlsplit

FAULTS = ("slowdown", "drop", "truncate")
_WINDOW = 20  # requests over which the share of faults is exact

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "content-length"}

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<Resource>{resource}</Resource><RequestId>faulty-proxy</RequestId></Error>"
)


class FaultyS3Proxy:
    """`endpoint` forwards to `upstream`; set `failure_rate`, `faults`, `scope` and `deny` at any time.

    `injected` counts the faults answered by kind and `requests` every request seen, so a test
    can show that its run really met the faults it claims to survive.
    """

    def __init__(self, upstream: str, *, failure_rate: float = 0.0, faults=FAULTS, seed: int = 0):
        self.upstream = urlsplit(upstream)
        self.failure_rate = failure_rate
        self.faults = tuple(faults)
        self.scope = ""
        self.deny: set[str] = set()
        self.injected: Counter = Counter()
        self.requests = 0
        self._rng = random.Random(seed)
        self._window: list[bool] = []  # whether each of the next requests fails, last first
        self._window_rate = failure_rate
        self._faulted = 0
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultyS3Proxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def draw(self, method: str, path: str) -> str | None:
        """The fault for the next request, or None to forward it as it is."""
        with self._lock:
            self.requests += 1
            if path.lstrip("/").split("/", 1)[0].split("?", 1)[0] in self.deny:
                fault = "deny"
            elif self.faults and self.scope in f"{method} {path}" and self._next_fails():
                fault = self.faults[self._faulted % len(self.faults)]
                self._faulted += 1
            else:
                return None
            self.injected[fault] += 1
            return fault

    def _next_fails(self) -> bool:
        if not self._window or self._window_rate != self.failure_rate:
            failing = round(self.failure_rate * _WINDOW)
            self._window = [True] * failing + [False] * (_WINDOW - failing)
            self._rng.shuffle(self._window)
            self._window_rate = self.failure_rate
        return self._window.pop()


def _handler(proxy: FaultyS3Proxy):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, format, *args):  # the test's output is not the place for access logs
            pass

        def _serve(self):
            body = self._read_body()
            fault = proxy.draw(self.command, self.path)
            if fault == "drop":
                return self._reset()
            if fault == "slowdown":
                return self._error(503, "SlowDown", "Please reduce your request rate.")
            if fault == "deny":
                return self._error(403, "AccessDenied", "Access Denied")
            status, headers, data = self._forward(body)
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            if self.command == "HEAD":
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if fault == "truncate" and len(data) > 1:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                return self._reset()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes):
            upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
            try:
                # The client's Host header is kept: it is part of what the client signed.
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        upstream.putheader(name, value)
                upstream.putheader("Content-Length", str(len(body)))
                upstream.endheaders(body)
                response = upstream.getresponse()
                data = response.read()
                headers = [(k, v) for k, v in response.getheaders()
                           if k.lower() not in _HOP_BY_HOP or (self.command == "HEAD" and k.lower() == "content-length")]
                return response.status, headers, data
            finally:
                upstream.close()

        def _error(self, status: int, code: str, message: str) -> None:
            data = _ERROR_XML.format(code=code, message=message, resource=self.path.split("?")[0]).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _reset(self) -> None:
            """Close with a TCP reset, as a dying load balancer does, not a polite FIN."""
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    return Handler
