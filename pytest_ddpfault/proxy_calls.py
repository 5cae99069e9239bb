"""The Toxiproxy HTTP API as a client calls it: stdlib only, a timeout on every call.

Shared by the harness (``toxiproxy/client.py``: the store proxy, the data-plane link
proxies) and by the ranks, which point their links' proxies at the peers' real gloo
listeners (``rank/gloo_addresses.py``) and put an in-rank-triggered network fault in place.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

from pytest_ddpfault.deadline import Deadline

__all__ = ["API_TIMEOUT", "ProxyHandle", "ToxiproxyAPI", "ToxiproxyError"]

API_TIMEOUT = 10.0


class ToxiproxyError(RuntimeError):
    pass


class ToxiproxyAPI:
    """The Toxiproxy HTTP API, with a timeout on every call."""

    def __init__(self, url: str, timeout: float = API_TIMEOUT) -> None:
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if not parsed.hostname or not parsed.port:
            raise ToxiproxyError(f"toxiproxy url {url!r}: expected http://HOST:PORT")
        self.url = f"http://{parsed.hostname}:{parsed.port}"
        self.host, self.port = parsed.hostname, parsed.port
        self.timeout = timeout

    def call(self, method: str, path: str, body=None, deadline: Deadline | None = None):
        """One request; it waits ``timeout`` at most, and never past ``deadline``."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        timeout = self.timeout if deadline is None else max(0.05, min(self.timeout, deadline.remaining()))
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            raise ToxiproxyError(f"toxiproxy at {self.url}: {method} {path} -> {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ToxiproxyError(f"toxiproxy at {self.url}: {method} {path} failed: {exc}") from None
        return json.loads(text) if text.strip() else None

    def version(self) -> str:
        answer = self.call("GET", "/version")
        return answer.get("version", "") if isinstance(answer, dict) else str(answer)

    def create_proxy(self, name: str, upstream: str, listen: str = "127.0.0.1:0") -> dict:
        return self.call("POST", "/proxies", {"name": name, "upstream": upstream, "listen": listen})

    def set_enabled(self, name: str, enabled: bool, deadline: Deadline | None = None) -> dict:
        return self.call("POST", f"/proxies/{name}", {"enabled": enabled}, deadline)

    def set_upstream(self, name: str, upstream: str, deadline: Deadline | None = None) -> dict:
        """Point the proxy at ``upstream`` (the server restarts it: open connections drop)."""
        return self.call("POST", f"/proxies/{name}", {"upstream": upstream}, deadline)

    def delete_proxy(self, name: str, deadline: Deadline | None = None) -> None:
        self.call("DELETE", f"/proxies/{name}", deadline=deadline)

    def add_toxic(self, proxy: str, body: dict, deadline: Deadline | None = None) -> dict:
        return self.call("POST", f"/proxies/{proxy}/toxics", body, deadline)

    def remove_toxic(self, proxy: str, name: str, deadline: Deadline | None = None) -> None:
        self.call("DELETE", f"/proxies/{proxy}/toxics/{name}", deadline=deadline)


class ProxyHandle:
    """One proxy of a run, as the network fault kinds act on it (the store's, or a link's).

    No request waits past ``deadline`` (the run's, once its ranks exist)."""

    api: ToxiproxyAPI
    name: str
    deadline: Deadline | None = None

    def set_enabled(self, enabled: bool) -> None:
        self.api.set_enabled(self.name, enabled, self.deadline)

    def add_toxic(self, body: dict) -> None:
        self.api.add_toxic(self.name, body, self.deadline)

    def remove_toxic(self, name: str) -> None:
        self.api.remove_toxic(self.name, name, self.deadline)

    def close(self, deadline: Deadline | None = None) -> None:
        try:
            self.api.delete_proxy(self.name, deadline)
        except ToxiproxyError:
            pass  # the server may be gone already; nothing of ours is left on it then
