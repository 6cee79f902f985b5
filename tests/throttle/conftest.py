"""Fixtures of the throttling tests: the tiny IMAP backend and a real redis-server."""

import shutil
import subprocess

import pytest

from support.harness import free_port, wait_listening
from support.throttlekit import TinyImapBackend, require


@pytest.fixture
def backend():
    server = TinyImapBackend()
    yield server
    server.close()


@pytest.fixture
def redis_url(tmp_path):
    """A private redis-server (no persistence) for one test, stopped by pid afterwards."""
    require("redis-server", shutil.which("redis-server"))
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL)
    try:
        wait_listening(port, process, "redis-server")
        yield "redis://127.0.0.1:%d/0" % port
    finally:
        process.terminate()
        process.wait(10)
