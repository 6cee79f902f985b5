"""`edge(...)`: a mailproxy with IMAP, POP3 and SMTP servers, a RecordingAuthServer and fake backends
(support/peers.py); torn down by pid through `mailproxy_master`, with the log checked for alerts."""

import pytest

from support.peers import Edge


@pytest.fixture
def edge(mailproxy_master):
    made = []

    def make(**kw):
        made.append(Edge(mailproxy_master, **kw))
        return made[-1]

    yield make
    for one in made:
        one.close()
