"""Fuzzing the loader: whatever the input, the outcome is a Config or a ConfigError, never a crash.

Examples per test default to a modest number so the suite stays fast; HYPOTHESIS_EXAMPLES raises it
(CI sets 10000).
"""

import io
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailproxy.conf import ConfigError, check, load_config
from mailproxy.conf.directives import DIRECTIVES

# CI asks for 10,000 config examples (issue 2) with MAILPROXY_CONF_FUZZ_EXAMPLES; without it the count is the
# suite's profile (tests/conftest.py), which HYPOTHESIS_EXAMPLES sets.
_CONF_EXAMPLES = os.environ.get("MAILPROXY_CONF_FUZZ_EXAMPLES")
FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                **({"max_examples": int(_CONF_EXAMPLES)} if _CONF_EXAMPLES else {}))

VALUES = ["on", "off", "only", "v2", "0", "1", "-1", "60s", "1h30m", "500ms", "16k", "1m", "x", "auto", "stderr",
          "info", "127.0.0.1:8143", "[::1]:8143", "*:8110", "8025", "unix:/tmp/mp-fuzz.sock", "127.0.0.1:6000-6002",
          "ssl", "proxy_protocol", "backlog=5", "rcvbuf=8k", "bind", "ipv6only=off", "so_keepalive=1m::3",
          "127.0.0.1:9000/auth", "http://127.0.0.1", "unix:/tmp/a.sock:/auth", "10.0.0.1/8", "unix:", "imap",
          "pop3", "smtp", "plain", "login", "apop", "cram-md5", "external", "xoauth2", "none", "PLAIN",
          "shared:M:1m", "builtin", "TLSv1.3", "cert.pem", "*.conf", "logs/x.pid", "localhost", ""]
PUNCT = ["{", "}", ";", ";", "\n", " ", "#", '"', "'", "\\", '"a b"', "'x;y'", "\\n", "${x}"]
WORDS = [d.name for d in DIRECTIVES] + ["include", "foo", "ssl"]
TOKENS = st.sampled_from(WORDS + VALUES + PUNCT)


def run(tmp_path, data, directives=None):
    path = tmp_path / "fuzz.conf"
    path.write_bytes(data)
    try:
        config = load_config(str(path), prefix=str(tmp_path), directives=directives)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert config.main.worker_connections >= 0
    assert check(str(path), prefix=str(tmp_path), directives=directives, dump=True,
                 out=io.StringIO(), err=io.StringIO()) in (0, 1)


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes(tmp_path, data):
    run(tmp_path, data)


@FUZZ
@given(tokens=st.lists(TOKENS, max_size=60))
def test_token_soup(tmp_path, tokens):
    run(tmp_path, " ".join(tokens).encode())


@FUZZ
@given(tokens=st.lists(TOKENS, max_size=30), directives=st.lists(TOKENS, max_size=8))
def test_token_soup_inside_mail(tmp_path, tokens, directives):
    text = "events {}\nmail {\n auth_http 127.0.0.1:9000;\n server {\n listen 127.0.0.1:8143; protocol imap;\n"
    run(tmp_path, (text + " ".join(tokens) + "\n}\n}\n").encode(), directives=" ".join(directives) or None)
