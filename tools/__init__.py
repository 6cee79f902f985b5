"""The repository's own tools, not part of the installed product: private Dovecot and Postfix instances
(localmail.py) and the demo backend (demo_backend.py), for the quick start and the tests."""
