"""mailproxy: nginx's mail proxy (IMAP, POP3, SMTP) rebuilt in Python."""

__version__ = "0.1.0"
NAME = "mailproxy"
