"""One message shape on every channel: a dict with a "type"; unknown types and things
that are not messages are rejected loudly; a big message is shortened, never cut."""
from __future__ import annotations

import json
import os
import socket

import pytest

from pytest_ddpfault import ipc


def test_every_channel_carries_the_same_shape(tmp_path):
    msg = ipc.message("fault", kind="kill_rank", rank=1)
    [framed] = ipc.FrameReader().feed(ipc.encode_frame(msg))
    assert framed == msg == {"type": "fault", "kind": "kill_rank", "rank": 1}

    inbox = ipc.EventInbox(str(tmp_path / "ev"))
    try:
        ipc.EventSink(inbox.path).send("fault", kind="kill_rank", rank=1)
        assert inbox.drain() == [msg]
    finally:
        inbox.close()

    lines = str(tmp_path / "events.jsonl")
    ipc.LineSink(lines, attempt=2).send("fault", kind="kill_rank", rank=1)
    [line] = ipc.read_lines(lines)
    assert {k: line[k] for k in msg} == msg and line["attempt"] == 2 and line["pid"] == os.getpid()

    result = str(tmp_path / "rank0.result")
    ipc.write_file(result, "result", status="ok")
    assert ipc.read_file(result, ("result",)) == {"type": "result", "status": "ok"}
    assert ipc.read_file(str(tmp_path / "none"), ("result",)) is None


def test_an_unknown_message_is_rejected_naming_it_and_its_sender():
    handlers = {"fault": lambda m: "handled"}
    assert ipc.dispatch({"type": "fault"}, handlers, "rank 1") == "handled"
    with pytest.raises(ipc.UnknownMessage, match=r"unknown message 'faul' from rank 1 \(known: fault\)"):
        ipc.dispatch({"type": "faul"}, handlers, "rank 1")
    with pytest.raises(ipc.UnknownMessage, match="unknown message None"):
        ipc.dispatch({"kind": "fault"}, handlers, "rank 1")


def test_a_datagram_that_is_not_a_message_is_rejected(tmp_path):
    inbox = ipc.EventInbox(str(tmp_path / "ev"))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b'{"no": "type"}', inbox.path)
        with pytest.raises(ipc.UnknownMessage, match="without a type"):
            inbox.drain()
    finally:
        inbox.close()


def test_a_big_event_is_shortened_to_fit_and_stays_a_message(tmp_path):
    inbox = ipc.EventInbox(str(tmp_path / "ev"))
    try:
        ipc.EventSink(inbox.path).send("exception", message="m", traceback="x" * 500_000)
        [got] = inbox.drain()
    finally:
        inbox.close()
    assert got["type"] == "exception" and got["message"] == "m"
    assert got["traceback"].startswith("xxx") and "characters cut to fit a message" in got["traceback"]
    assert len(json.dumps(got)) <= ipc.MAX_EVENT
