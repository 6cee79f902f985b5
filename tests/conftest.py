"""The suite's tiers, its one hypothesis profile and the ``mailproxy_master`` fixture.

Tiers (markers, declared in pyproject.toml), one per test:

- ``unit``: no process is started; machines, parsers, the configuration, the auth_http client and the
  relay on in-process sockets. ``python3 -m pytest -m unit`` runs them alone, in under a minute.
- ``process``: starts mailproxy masters or other processes of this repository, no outside peer.
- ``peer``: talks to a real outside program: Dovecot, Postfix, Debian's nginx, Redis, PostgreSQL, slapd,
  haproxy, openssl s_client.

``slow`` is marked besides, on what takes more than a few seconds (loads, the bench, the quick start).
A test is ``unit`` unless the tables below or its own mark say otherwise, and a ``unit`` test that starts a
process fails, so the fast tier cannot quietly grow slow.

The shared helpers live in ``support/`` (pyproject.toml puts tests/ on sys.path).
"""

import os
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, settings

from support.harness import MINI_IMAP, MasterProcess

# Fixtures any test may name: dovecot and postfix (real backends), auth_server (a scripted auth_http server).
pytest_plugins = ("support.backends", "support.authhttp")

# One profile for every property and fuzzer; CI raises the count with HYPOTHESIS_EXAMPLES.
settings.register_profile(
    "mailproxy",
    max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES") or 100),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("mailproxy")

TESTS = os.path.dirname(os.path.abspath(__file__))

# By folder, then by module (a module's entry wins over its folder's); single tests carry their own mark.
PEER = {
    "authstores", "e2e", "oauth/test_oauth_e2e.py", "sieve/test_sieve_e2e.py", "throttle/test_authserver_redis.py",
    "throttle/test_two_nodes_redis.py", "tls", "upstream_tls", "upstream/test_backends_real.py",
    "beyond/test_auth_cache.py", "beyond/test_client_id.py", "beyond/test_imap_client_id.py",
    "beyond/test_smtp_backend_auth.py", "beyond/test_sni.py", "edge/test_proxy_protocol_backends.py",
    "edge/test_proxy_protocol_listen.py", "edge/test_scale_out.py", "observability/test_observability.py",
    "relay/test_tls_pump_worker.py", "test_quickstart.py", "conf/test_conf_cases.py", "differential",
}
PROCESS = {
    "beyond", "reliability", "resolver/test_resolver_e2e.py", "throttle", "observability",
    "oauth/test_oauth_e2e.py",
    "relay/test_tls_pump.py", "relay/test_load.py", "relay/test_integrity.py",
    "relay/test_lifecycle.py", "test_authserver.py", "test_authserver_attacks.py", "test_bench_quick.py",
    "test_demo_backend.py", "test_error_log_targets.py", "test_master.py", "test_process_control.py",
    "test_systemd_unit.py",
}
UNIT = {"tls/test_tls_context.py", "upstream_tls/test_machines.py", "reliability/test_machine_fuzz.py",
        "throttle/test_zone.py", "tls/test_session_cache_density.py", "differential/test_diff_streams.py"}
SLOW = {"test_bench_quick.py", "test_quickstart.py", "relay/test_load.py", "reliability/test_capacity.py",
        "reliability/test_cuts.py", "reliability/test_faults.py", "edge/test_scale_out.py", "differential",
        "e2e/test_imap_parity.py", "e2e/test_pop3_parity.py", "e2e/test_smtp_parity.py", "conf/test_conf_cases.py"}
TIERS = ("unit", "process", "peer")


def _listed(where, table):
    folder = where.split("/")[0]
    return where in table or folder in table


def _tier(where):
    for tier, table in (("unit", UNIT), ("peer", PEER), ("process", PROCESS)):
        if where in table:
            return tier
    for tier, table in (("peer", PEER), ("process", PROCESS)):
        if where.split("/")[0] in table:
            return tier
    return "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        where = os.path.relpath(str(item.path), TESTS).replace(os.sep, "/")
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(_tier(where))
        if _listed(where, SLOW):
            item.add_marker(pytest.mark.slow)


def _no_process(*args, **kwargs):
    raise AssertionError("a unit test started a process: mark it process or peer (tests/conftest.py)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A unit test, its fixtures included, may start no process: fork and exec fail while it runs."""
    if item.get_closest_marker("unit") is None:
        yield
        return
    # subprocess keeps its own reference to fork_exec; posix_spawn is its other way to start a program.
    hooks = ((os, "fork"), (os, "posix_spawn"), (os, "posix_spawnp"), (subprocess, "_fork_exec"))
    saved = [getattr(module, name) for module, name in hooks]
    for module, name in hooks:
        setattr(module, name, _no_process)
    try:
        yield
    finally:
        for (module, name), original in zip(hooks, saved):
            setattr(module, name, original)


@pytest.fixture
def mailproxy_master(tmp_path):
    """Factory: mailproxy_master(config_text, daemon=False, handler=MINI_IMAP, env=None, start=True)."""
    started = []

    def start(config_text, daemon=False, handler=MINI_IMAP, env=None, start=True):
        prefix = tempfile.mkdtemp(prefix="mp", dir=str(tmp_path))
        master = MasterProcess(prefix, config_text, handler, env)
        started.append(master)
        if start:
            master.start(daemon=daemon)
        return master

    yield start
    for master in started:
        master.kill_leftovers()
