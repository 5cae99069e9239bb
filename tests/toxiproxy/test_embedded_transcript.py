"""Replay a real Toxiproxy 2.8.0 server's recorded answers against the embedded server."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

#: a copy of shared/toxiproxy-2.8-transcript.json: a real 2.8.0 server's answers
TRANSCRIPT = pathlib.Path(__file__).with_name("toxiproxy-2.8-transcript.json")
BAD_BODY = "bad request body: "
_ADDRESS = re.compile(r"127\.0\.0\.1:(\d+)")


def _load() -> dict:
    return json.loads(TRANSCRIPT.read_text())


def _normalise(value: Any, upstream_port: int) -> Any:
    """Ports -> UPSTREAM/PORT as in the recording; the leaked ``Logger`` key dropped."""
    if isinstance(value, dict):
        return {k: _normalise(v, upstream_port) for k, v in value.items() if k != "Logger"}
    if isinstance(value, list):
        return [_normalise(v, upstream_port) for v in value]
    if isinstance(value, str):
        return _ADDRESS.sub(
            lambda m: "127.0.0.1:" + ("UPSTREAM" if int(m.group(1)) == upstream_port else "PORT"),
            value)
    return value


def _same_error(got: Any, want: Any) -> bool:
    """Go's JSON decoder words errors its own way: after ``bad request body:`` match the prefix."""
    if not (isinstance(got, dict) and isinstance(want, dict)):
        return False
    message = want.get("error")
    if not (isinstance(message, str) and message.startswith(BAD_BODY)):
        return False
    rest = {k: v for k, v in want.items() if k != "error"}
    return ({k: v for k, v in got.items() if k != "error"} == rest
            and str(got.get("error", "")).startswith(BAD_BODY))


def test_transcript_replays_exactly(api, echo_upstream):
    transcript = _load()
    calls = transcript["calls"]
    assert calls, "empty transcript"
    for number, call in enumerate(calls):
        request = call["request"]
        body = request["body"]
        data = None
        if body is not None:
            data = json.dumps(body).replace("127.0.0.1:UPSTREAM", echo_upstream.address)
        answer = api.request(request["method"], request["path"], data=data,
                             headers=request["headers"] or {})
        where = f"call #{number} {request['method']} {request['path']} {data}"

        assert answer.status_code == call["status"], f"{where}: {answer.text}"
        assert answer.headers.get("Content-Type") == call["content_type"], where
        want_text = call["body_text"]
        if call["body_json"] is None:
            assert answer.text == want_text, where
            continue
        got = _normalise(answer.json(), echo_upstream.port)
        want = _normalise(call["body_json"], echo_upstream.port)
        assert got == want or _same_error(got, want), f"{where}\n got: {got}\nwant: {want}"
        assert answer.text.endswith("\n") == want_text.endswith("\n"), f"{where}: trailing newline"
        assert "Logger" not in answer.text, where


def test_transcript_covers_every_endpoint():
    """The replay is only as good as the recording: check it exercises the whole API."""
    seen = {(c["request"]["method"], re.sub(r"/proxies/[^/]+", "/proxies/P",
                                            re.sub(r"/toxics/[^/]+", "/toxics/T", c["request"]["path"])))
            for c in _load()["calls"]}
    for route in [("GET", "/version"), ("GET", "/proxies"), ("POST", "/proxies"),
                  ("POST", "/populate"), ("GET", "/proxies/P"), ("PATCH", "/proxies/P"),
                  ("DELETE", "/proxies/P"), ("GET", "/proxies/P/toxics"),
                  ("POST", "/proxies/P/toxics"), ("PATCH", "/proxies/P/toxics/T"),
                  ("DELETE", "/proxies/P/toxics/T"), ("POST", "/reset")]:
        assert route in seen, route
