"""Fixtures for the auth_http tests; the server and helpers live in authhttp_helpers."""

from authhttp_helpers import auth_server  # noqa: F401  (a fixture, used by name)
