"""IMAP transcripts (spec 2.1, 9) as data; tests/protocol/test_imap.py plays them."""
