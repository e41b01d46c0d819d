"""A local stand-in for the few Hugging Face hub HTTP endpoints that `HfApi.create_repo` and `HfApi.upload_folder`
call (no network): repo creation, the pre-upload check (every file answered "regular", so the contents travel
inline in the commit and no LFS / Xet storage is needed), and the commit (NDJSON: a header, then one line per file
with its base64 content), and the model card's metadata check. Files land in `server.repos[repo_id][path]`; every request is recorded with its
Authorization header, so a test can check the token was sent and never written anywhere else."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.private: dict[str, bool] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self.unknown: list[str] = []
        self.validated: list[dict] = []  # README.md metadata the commit had checked
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep the test output clean
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    return self.rfile.read(n)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return b""

            def _send(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802
                body = self._body()
                hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
                parts = self.path.split("?")[0].strip("/").split("/")
                if self.headers.get("Authorization") != "Bearer hf_fake_token":
                    return self._send(401, {"error": "Invalid credentials"})
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(body)
                    repo = f"{req.get('organization') or 'me'}/{req['name']}"
                    if repo in hub.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": repo})
                    hub.repos[repo] = {}
                    hub.private[repo] = bool(req.get("private")) or req.get("visibility") == "private"
                    return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if parts[:2] == ["api", "validate-yaml"]:  # the commit checks README.md's metadata first
                    import yaml

                    content = json.loads(body)["content"]
                    try:
                        meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                    except yaml.YAMLError as e:
                        return self._send(400, {"errors": [{"message": str(e)}]})
                    hub.validated.append(meta)
                    return self._send(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
                    req = json.loads(body)
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False, "oid": None} for f in req["files"]]})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit":
                    repo = f"{parts[2]}/{parts[3]}"
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            v = item["value"]
                            hub.repos.setdefault(repo, {})[v["path"]] = base64.b64decode(v["content"])
                    return self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/abc123",
                                            "commitOid": "abc123" + "0" * 34, "pullRequestUrl": None})
                hub.unknown.append(f"POST {self.path}")
                return self._send(404, {"error": f"not in the stand-in: {self.path}"})

            def do_GET(self) -> None:  # noqa: N802
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                hub.unknown.append(f"GET {self.path}")
                return self._send(404, {"error": f"not in the stand-in: {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
