"""A loopback chat-completions server for tests and benchmarks: a real HTTP server on
127.0.0.1 (threaded), whose answers a subclass scripts in `answer(body, headers)`. It records
the request bodies, the Authorization headers and the most requests it had in flight."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(content: str) -> dict:
    """A chat-completions response body whose message is content."""
    return {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content},
         "finish_reason": "stop"}]}


class LoopbackServer:
    """`answer(body, headers)` returns (status, payload, headers): payload a dict (sent as
    JSON) or bytes. It may call `self.sleep(s)` to be slow without counting as in flight."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.auth: set[str | None] = set()
        self.bodies: list[dict] = []
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                with outer.lock:
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    with outer.lock:
                        outer.auth.add(self.headers.get("Authorization"))
                        outer.bodies.append(body)
                    outer.reply(self, *outer.answer(body, self.headers))
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with outer.lock:
                        outer.inflight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, body: dict, headers) -> tuple[int, dict | bytes, dict]:
        raise NotImplementedError

    def count(self, key: str) -> int:
        """How many times key was asked before (0 the first time), counting this one."""
        with self.lock:
            n = self.calls.get(key, 0)
            self.calls[key] = n + 1
        return n

    def sleep(self, seconds: float) -> None:
        """Be slow (past a client's timeout) without counting as a request in flight."""
        with self.lock:
            self.inflight -= 1
        time.sleep(seconds)
        with self.lock:
            self.inflight += 1

    @staticmethod
    def reply(h, status: int, payload, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
