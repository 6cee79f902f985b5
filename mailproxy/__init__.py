"""mailproxy: nginx's mail proxy (IMAP, POP3, SMTP) rebuilt in Python."""

__version__ = "0.1.0"
# The nginx whose mail module, configuration and logs mailproxy follows (tests/: its 1.22.1 baseline).
NGINX_VERSION = "1.22.1"
NAME = "mailproxy"
