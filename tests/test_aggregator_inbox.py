"""The aggregator's bounded inbox: a burst of messages waits at the door (and so at the broker)
instead of filling the aggregator's memory; order is kept and markers never wait."""

from __future__ import annotations

import queue
import threading

import pytest

from truscl.server.aggregator import Inbox


def test_a_put_beyond_the_bound_waits_until_the_worker_takes_enough() -> None:
    inbox = Inbox(max_bytes=100)
    inbox.put(("a", b"x" * 60))
    second_in = threading.Event()

    def producer() -> None:
        inbox.put(("b", b"y" * 60))  # 120 bytes would be held: waits
        second_in.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not second_in.wait(0.2)  # still waiting (a slow machine can only make this pass)
    inbox.put(None)  # a marker gets in even now, behind what is queued
    assert inbox.get(timeout=5) == ("a", b"x" * 60)
    thread.join(10)
    assert second_in.is_set()
    assert inbox.get(timeout=5) is None
    assert inbox.get(timeout=5) == ("b", b"y" * 60)
    assert inbox.empty()
    with pytest.raises(queue.Empty):
        inbox.get(timeout=0.01)


def test_one_message_larger_than_the_bound_still_gets_in_alone() -> None:
    inbox = Inbox(max_bytes=10)
    inbox.put(("big", b"z" * 50))
    assert inbox.get(timeout=5) == ("big", b"z" * 50)


def test_a_closed_inbox_lets_a_waiting_sender_go_and_keeps_only_the_stop_marker() -> None:
    inbox = Inbox(max_bytes=100)
    inbox.put(("a", b"x" * 80))
    inbox.put(None)
    sender = threading.Thread(target=inbox.put, args=(("b", b"y" * 80),))
    sender.start()

    inbox.close()  # the worker has stopped: nothing will make room

    sender.join(10)
    assert not sender.is_alive()
    assert inbox.get(timeout=5) is None
    inbox.put(("c", b"z"))  # dropped: nobody will read it
    assert inbox.empty()
