"""A tiny stand-in for the Hugging Face hub on 127.0.0.1, so the real `huggingface_hub` client runs unmodified.

It answers the requests `snapshot_download` makes (huggingface_hub 1.x), the way huggingface.co answers them:
  GET  /api/models/{repo}[/revision/{rev}]     model info: sha, siblings, gated
  GET  /api/models/{repo}/tree/{rev}           the file listing (no pagination: no Link header)
  HEAD /{repo}/resolve/{rev}/{file}            X-Repo-Commit, ETag, Content-Length
  GET  /{repo}/resolve/{rev}/{file}            the bytes; honours `Range: bytes=N-` (206) so downloads resume
A missing repo is 401 + `X-Error-Code: RepoNotFound` (what the hub says to an anonymous client). A gated repo
lists its metadata and files but refuses the files: 401 without a token, 403 with one (not on the authorized
list), both with `X-Error-Code: GatedRepo` and the hub's X-Error-Message. Failures are injected per file:
`drop[file] = n` sends n bytes of the next GET then closes the connection; `down` makes every later GET of a
dropped file answer 503, like a mirror going away mid-download. `log` records (method, path, Range) of each request.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, Optional
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    gated: bool = False
    sha: str = field(init=False)  # the commit: changes with any file
    etags: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.etags = {name: hashlib.sha256(data).hexdigest() for name, data in self.files.items()}
        self.sha = hashlib.sha1(json.dumps(self.etags, sort_keys=True).encode()).hexdigest()


@dataclass
class HubServer:
    repos: dict[str, FakeRepo]
    drop: dict[str, int] = field(default_factory=dict)
    down: bool = False
    log: list[tuple[str, str, Optional[str]]] = field(default_factory=list)
    _dropped: set[str] = field(default_factory=set)

    def gets(self, filename: str) -> list[Optional[str]]:
        """The Range header of every GET of `filename` (None for a full request)."""
        return [rng for method, path, rng in self.log if method == "GET" and path.endswith("/" + filename)
                and "/resolve/" in path]


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _reply(self, status: int, headers: dict[str, str], payload: bytes = b"", body: bool = True) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(payload)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def _json(self, data: object) -> None:
            self._reply(200, {"Content-Type": "application/json"}, json.dumps(data).encode())

        def _error(self, status: int, code: str, message: str, body: bool = True) -> None:
            self._reply(status, {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
                        json.dumps({"error": message}).encode(), body)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.log.append((self.command, path, self.headers.get("Range")))
            for pattern, route in ((_TREE, self._tree), (_INFO, self._info), (_RESOLVE, self._resolve)):
                match = pattern.match(path)
                if match:
                    repo = hub.repos.get(match["repo"])
                    if repo is None:
                        self._error(401, "RepoNotFound", "Repository not found", body)
                        return
                    if match["rev"] not in (None, "main", repo.sha):
                        self._error(404, "RevisionNotFound", f"Invalid rev id: {match['rev']}", body)
                        return
                    route(match, repo, body)
                    return
            self._reply(404, {}, b"Not Found", body)

        def _info(self, match: re.Match, repo: FakeRepo, body: bool) -> None:
            self._json({"id": match["repo"], "sha": repo.sha, "private": False,
                        "gated": "manual" if repo.gated else False,
                        "siblings": [{"rfilename": name} for name in sorted(repo.files)]})

        def _tree(self, match: re.Match, repo: FakeRepo, body: bool) -> None:
            self._json([{"type": "file", "path": name, "size": len(data), "oid": repo.etags[name]}
                        for name, data in sorted(repo.files.items())])

        def _resolve(self, match: re.Match, repo: FakeRepo, body: bool) -> None:
            name = match["file"]
            if repo.gated:
                if self.headers.get("Authorization"):
                    self._error(403, "GatedRepo", f"Access to model {match['repo']} is restricted and you are not in "
                                f"the authorized list. Visit https://huggingface.co/{match['repo']} to ask for access.",
                                body)
                else:
                    self._error(401, "GatedRepo", f"Access to model {match['repo']} is restricted. You must have "
                                "access to it and be authenticated to access it. Please log in.", body)
                return
            if name not in repo.files:
                self._error(404, "EntryNotFound", f"{name} does not exist on \"main\"", body)
                return
            data = repo.files[name]
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{repo.etags[name]}"',
                       "Accept-Ranges": "bytes"}
            if not body:
                self._reply(200, {**headers, "Content-Length": str(len(data))}, body=False)
                return
            if name in hub._dropped and hub.down:
                self._reply(503, {}, b"Service Unavailable")
                return
            start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if name in hub.drop and name not in hub._dropped:
                hub._dropped.add(name)
                self.send_response(206 if start else 200)
                for key, value in {**headers, "Content-Length": str(len(data) - start)}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data[start:start + hub.drop[name]])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the connection dies mid-file
                self.close_connection = True
                return
            self._reply(206 if start else 200, headers, data[start:])

    return Handler


@contextmanager
def serve(hub: HubServer) -> Iterator[str]:
    """Run `hub` on a free 127.0.0.1 port; yields its URL (what HF_ENDPOINT should be set to)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def closed_port() -> Iterator[str]:
    """A 127.0.0.1 URL where nothing listens: connections are refused at once, like an unreachable hub."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: the port stays ours and refuses connections
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
