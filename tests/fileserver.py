"""A real HTTP server on 127.0.0.1, in a thread, serving bytes the tests made.

It speaks HTTP/1.1 with Range support, states hashes the way the hub (sha256 ETag on
large files) and Azure (Content-MD5) do, or none, and can misbehave on request: cut a
transfer once, ignore Range, lie about Content-Length, serve corrupt bytes (keeping the
stated hash), serve other bytes in a file's place (an HTML page, a truncated file: with a
length and hash of their own, as a broken mirror would), answer with a status, or send
slowly. A client that hangs up mid-transfer is no error.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Set, Tuple


@dataclass
class Behaviour:
    cut_once: Set[str] = field(default_factory=set)  # paths whose next transfer stops half way
    ignore_range: bool = False
    extra_length: Dict[str, int] = field(default_factory=dict)  # claim more bytes than sent
    corrupt: Set[str] = field(default_factory=set)  # flip a byte, keep the stated hash
    status: Dict[str, int] = field(default_factory=dict)
    hash_style: str = "hub"  # "hub": sha256 ETag; "azure": Content-MD5; "none"
    replace: Dict[str, bytes] = field(default_factory=dict)  # path -> bytes served instead
    rate: Optional[float] = None  # bytes per second of every body; None: as fast as it goes


class _Server(ThreadingHTTPServer):

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up
            super().handle_error(request, client_address)


class FileServer:
    def __init__(self, files: Dict[str, bytes]):
        self.files = dict(files)
        self.behaviour = Behaviour()
        self.requests: List[Tuple[str, Optional[str], int]] = []  # (path, Range, status)
        self.times: List[float] = []  # time.monotonic() of each request, as self.requests
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                try:
                    server._serve(self)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client went away (killed, say)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        # a short poll: shutdown() waits for it, at the end of every test
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        b = self.behaviour
        path = h.path.split("?")[0]
        rng = h.headers.get("Range")
        self.times.append(time.monotonic())
        if path in b.status:
            self.requests.append((path, rng, b.status[path]))
            h.send_response(b.status[path])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if path not in self.files:
            self.requests.append((path, rng, 404))
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = b.replace.get(path, self.files[path])
        body = bytearray(data)
        if path in b.corrupt:
            body[len(body) // 2] ^= 0xFF
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        partial = bool(m) and not b.ignore_range
        if partial:
            start = int(m.group(1))
            if start >= len(data):
                self.requests.append((path, rng, 416))
                h.send_response(416)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        payload = bytes(body[start:])
        status = 206 if partial else 200
        self.requests.append((path, rng, status))
        h.send_response(status)
        if partial:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(payload) + b.extra_length.get(path, 0)))
        if b.hash_style == "hub" and len(data) > 1024:
            h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        elif b.hash_style == "azure" and not partial:
            h.send_header("Content-MD5", base64.b64encode(hashlib.md5(data).digest()).decode())
        h.end_headers()
        if path in b.cut_once:
            b.cut_once.discard(path)
            h.wfile.write(payload[: len(payload) // 2])
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        self._send(h, payload)
        if b.extra_length.get(path):
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True

    def _send(self, h: BaseHTTPRequestHandler, payload: bytes) -> None:
        if not self.behaviour.rate:
            h.wfile.write(payload)
            return
        piece = 8192
        for i in range(0, len(payload), piece):
            h.wfile.write(payload[i:i + piece])
            h.wfile.flush()
            time.sleep(len(payload[i:i + piece]) / self.behaviour.rate)
