"""Debian's ``docker-registry`` on loopback for the image-update tests, plus a counting proxy.

``LocalRegistry`` runs one registry process on a free port with its storage in a temp dir
(optionally behind basic auth from an htpasswd file); ``push`` builds a tiny busybox image
(FROM scratch, nothing pulled) and pushes it under a tag. ``Proxy`` sits in front of a registry:
it counts requests by path and can answer a Bearer challenge, garbage, errors or slowly,
so the client's behaviour is seen on the wire.
"""

from __future__ import annotations

import http.client
import http.server
import json
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from typing import Any

from tests.helpers import free_port

LABEL = "cynchrod-test-updates"


class LocalRegistry:
    def __init__(self, root: pathlib.Path, *, htpasswd: tuple[str, str] | None = None,
                 storage: pathlib.Path | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = storage or root / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        auth = ""
        if htpasswd is not None:
            user, password = htpasswd
            subprocess.run(["htpasswd", "-Bbc", str(root / "htpasswd"), user, password], check=True,
                           capture_output=True)
            auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {root / 'htpasswd'}\n"
        config = root / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n" + auth)
        self.log = open(root / "registry.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # 401 with auth: it answers
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    log = (root / "registry.log").read_text()
                    raise AssertionError(f"docker-registry did not start: {log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


class Pusher:
    """Builds one image per distinct ``content`` and pushes it as ``HOST/REPO:TAG``; removes its tags."""

    def __init__(self) -> None:
        self.tags: list[str] = []
        self.ctx = pathlib.Path(tempfile.mkdtemp(prefix="cynchrod-updates-"))
        shutil.copy("/bin/busybox", self.ctx / "busybox")

    def push(self, host: str, repo: str, tag: str, *, content: str = "one", broken: bool = False) -> str:
        """``broken``: an image with no programs at all (its containers cannot start)."""
        (self.ctx / "Dockerfile").write_text(
            f'FROM scratch\nCOPY Dockerfile /Dockerfile\nLABEL {LABEL}.content="{content}"\n' if broken else
            "FROM scratch\nCOPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
            f'LABEL {LABEL}.content="{content}"\n'
            'CMD ["sh", "-c", "sleep 3600"]\n')
        name = f"{host}/{repo}:{tag}"
        subprocess.run(["docker", "build", "-q", "--label", LABEL, "-t", name, str(self.ctx)], check=True,
                       capture_output=True)
        subprocess.run(["docker", "push", "-q", name], check=True, capture_output=True)
        self.tags.append(name)
        return name

    def cleanup(self) -> None:
        """Remove the pushed tags, and the copies the engine pulled back through a registry or a proxy
        for the apps under test (named by those hosts, carrying this module's label)."""
        for name in self.tags:
            subprocess.run(["docker", "rmi", "-f", name], capture_output=True)
        listed = subprocess.run(["docker", "images", "--filter", f"label={LABEL}", "--format",
                                 "{{.Repository}}:{{.Tag}}"], capture_output=True, text=True).stdout.split()
        pulled = [n for n in listed if n.startswith("127.0.0.1:") and not n.endswith(":<none>")]
        if pulled:
            subprocess.run(["docker", "rmi", "-f", *pulled], capture_output=True)
        dangling = subprocess.run(["docker", "images", "-q", "--filter", f"label={LABEL}", "--filter", "dangling=true"],
                                  capture_output=True, text=True).stdout.split()
        if dangling:
            subprocess.run(["docker", "rmi", *sorted(set(dangling))], capture_output=True)
        shutil.rmtree(self.ctx, ignore_errors=True)


class Proxy:
    """A loopback HTTP proxy in front of ``upstream`` (host:port) that counts requests per path.

    ``mode``: ``pass`` (forward), ``bearer`` (ask for a token from its own /token first), ``garbage``
    (200 with a body that is not JSON), ``error`` (500), ``slow`` (hold the request ``delay`` seconds),
    ``ratelimit`` (429 with Retry-After: 30), ``paginate`` (tag lists in pages of two with ``Link`` headers:
    docker-registry 2.8's filesystem storage ignores ``n`` and answers every tag at once)."""

    def __init__(self, upstream: str, *, mode: str = "pass", delay: float = 0.0) -> None:
        self.upstream = upstream
        self.mode = mode
        self.delay = delay
        self.count: Counter[str] = Counter()
        self.token_requests: list[dict[str, str]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._handle(body=False)

            def do_GET(self) -> None:
                self._handle(body=True)

            def _reply(self, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _handle(self, *, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/token":
                    proxy.token_requests.append({"authorization": self.headers.get("Authorization", ""),
                                                 "query": self.path.partition("?")[2]})
                    self._reply(200, {"Content-Type": "application/json"},
                                json.dumps({"token": "tok-1", "expires_in": 300}).encode(), body)
                    return
                proxy.count[path] += 1
                if proxy.mode == "slow":
                    time.sleep(proxy.delay)
                if proxy.mode == "garbage":
                    self._reply(200, {"Content-Type": "application/json"}, b"<html>not a registry</html>", body)
                    return
                if proxy.mode == "error":
                    self._reply(500, {}, b"boom", body)
                    return
                if proxy.mode == "ratelimit":
                    self._reply(429, {"Retry-After": "30"}, b"", body)
                    return
                if proxy.mode == "bearer" and self.headers.get("Authorization") != "Bearer tok-1":
                    realm = f"http://127.0.0.1:{proxy.port}/token"
                    self._reply(401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="test"'}, b"", body)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization")}
                if proxy.mode == "bearer":
                    headers.pop("Authorization", None)
                conn.request(self.command, self.path, headers=headers)
                response = conn.getresponse()
                data = response.read()
                keep = {k: v for k, v in response.getheaders()
                        if k.lower() in ("content-type", "docker-content-digest", "link", "www-authenticate")}
                if proxy.mode == "paginate" and path.endswith("/tags/list"):
                    tags = sorted(json.loads(data)["tags"])
                    last = dict(p.split("=", 1) for p in self.path.partition("?")[2].split("&") if "=" in p).get("last")
                    rest = [t for t in tags if last is None or t > last]
                    page = rest[:2]
                    data = json.dumps({"name": "x", "tags": page}).encode()
                    if len(rest) > 2:
                        keep["Link"] = f'<{path}?n=2&last={page[-1]}>; rel="next"'
                if "Link" in keep:  # point the next page at the proxy
                    keep["Link"] = keep["Link"].replace(proxy.upstream, f"127.0.0.1:{proxy.port}")
                self._reply(response.status, keep, data, body)
                conn.close()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
