"""A loopback HTTP endpoint that records the POSTs it gets (notification tests)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Recorder:
    """``with Recorder() as r: ... r.url ... r.posts`` (list of (path, parsed JSON or text))."""

    def __init__(self, status: int = 200) -> None:
        self.posts: list[tuple[str, object]] = []
        self.status = status
        rec = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode(errors="replace")
                try:
                    rec.posts.append((self.path, json.loads(body)))
                except ValueError:
                    rec.posts.append((self.path, body))
                self.send_response(rec.status)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def json_url(self, path: str = "hook") -> str:
        return f"json://127.0.0.1:{self.port}/{path}"

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
