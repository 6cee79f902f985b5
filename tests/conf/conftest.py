"""Helpers for configuration tests: write a config into a temporary directory and load it."""

import textwrap

import pytest

from mailproxy.conf import load_config

MAIL_HEAD = "events {}\n"


@pytest.fixture
def write_conf(tmp_path):
    """write_conf(text, name="mailproxy.conf") -> path; text is dedented."""

    def write(text, name="mailproxy.conf"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return str(path)

    return write


@pytest.fixture
def load(write_conf, tmp_path):
    """load(text, directives=None) -> Config, prefix = the temporary directory."""

    def load_text(text, directives=None):
        return load_config(write_conf(text), prefix=str(tmp_path), directives=directives)

    return load_text
