"""TLS: towards clients (client.py: one context per server block, built in the master; what a handshake
tells the session), certificates found by the TLS server name (by_name.py), towards backends
(upstream.py: proxy_ssl*, proxy_starttls), and what they share (openssl.py: the OpenSSL bridge, protocol
versions, certificate and key files, OpenSSL's error texts). No module here calls another's private
functions, and conf/ imports none of them: the command line hands -t the TLS preparation.
"""
