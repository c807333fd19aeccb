"""A real HTTP server on 127.0.0.1, in a thread, serving bytes the tests made.

It speaks HTTP/1.1 with Range support, states hashes the way the hub (sha256 ETag on
large files) and Azure (Content-MD5) do, and can misbehave on request: cut a transfer
once, ignore Range, lie about Content-Length, serve corrupt bytes, answer with a status.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import threading
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


class FileServer:
    def __init__(self, files: Dict[str, bytes]):
        self.files = dict(files)
        self.behaviour = Behaviour()
        self.requests: List[Tuple[str, Optional[str], int]] = []  # (path, Range, status)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

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
        data = self.files[path]
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
        h.wfile.write(payload)
        if b.extra_length.get(path):
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
