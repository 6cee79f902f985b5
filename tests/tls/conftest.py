"""The certificates of the TLS tests (support/pki.py), one set per module."""

import pytest

from support.pki import Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(str(tmp_path_factory.mktemp("pki")))
