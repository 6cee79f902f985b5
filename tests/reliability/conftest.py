"""`edge(...)`: a mailproxy with IMAP, POP3 and SMTP servers, a RecordingAuthServer and fake backends
(peers.py); torn down by pid through `mailproxy_master`, with the log checked for alerts."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import Edge  # noqa: E402


@pytest.fixture
def edge(mailproxy_master):
    made = []

    def make(**kw):
        made.append(Edge(mailproxy_master, **kw))
        return made[-1]

    yield make
    for one in made:
        one.close()
