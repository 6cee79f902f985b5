"""A DEMO mail backend for the quick start: not a mail server, never use it for real mail.

It lets a fresh machine without Dovecot or Postfix show a whole login through mailproxy, enough for curl,
imaplib and a mail client's first look: IMAP (LOGIN, CAPABILITY, LIST, STATUS, SELECT, SEARCH, FETCH and
UID FETCH of headers, sizes and whole messages, LOGOUT), POP3 (USER/PASS, STAT, LIST, UIDL, RETR, QUIT)
and SMTP (EHLO, XCLIENT, AUTH PLAIN, MAIL, RCPT, DATA, QUIT), all on loopback, mail kept in memory. It
trusts whoever connects, because only mailproxy (after the auth server said yes) should reach it.

Usage: python -m tools.demo_backend --imap 127.0.0.1:1143 --pop3 127.0.0.1:1110 --smtp 127.0.0.1:1025
"""

import argparse
import sys

from gevent import monkey

monkey.patch_all()

from gevent.server import StreamServer  # noqa: E402

MAILBOXES = {}  # login or recipient -> [message bytes]


def _lines(sock):
    reader = sock.makefile("rb")
    for line in reader:
        yield line.rstrip(b"\r\n")


WELCOME = [
    b"From: mailproxy <demo@example.com>\r\nSubject: welcome\r\n\r\nmailproxy demo backend\r\n",
    b"From: mailproxy <demo@example.com>\r\nSubject: how this got here\r\n\r\n"
    b"The proxy asked the auth server, logged in here for you, then relayed.\r\n",
]


def _mailbox(login):
    return MAILBOXES.setdefault(login.lower(), list(WELCOME))


def imap_session(sock, _address):
    sock.sendall(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] mailproxy DEMO backend ready\r\n")
    login = selected = None
    lines = _lines(sock)
    for line in lines:
        tag, _, rest = line.partition(b" ")
        command, _, args = rest.partition(b" ")
        command = command.upper()
        if command == b"UID":
            # UID FETCH/SEARCH: message numbers are the UIDs here (nothing is ever expunged).
            command, _, args = args.partition(b" ")
            command = command.upper()
        if command == b"LOGIN":
            user = _imap_argument(args, lines, sock)
            login = user.decode("utf-8", "replace") if user is not None else "demo"
            sock.sendall(tag + b" OK LOGIN completed\r\n")
        elif command == b"CAPABILITY":
            sock.sendall(b"* CAPABILITY IMAP4rev1 LITERAL+\r\n" + tag + b" OK completed\r\n")
        elif command in (b"LIST", b"LSUB") and login:
            sock.sendall(b'* %s (\\HasNoChildren) "/" INBOX\r\n%s OK %s completed\r\n' % (command, tag, command))
        elif command == b"STATUS" and login:
            box = _mailbox(login)
            sock.sendall(b"* STATUS INBOX (MESSAGES %d UIDNEXT %d UNSEEN 0)\r\n%s OK STATUS completed\r\n"
                         % (len(box), len(box) + 1, tag))
        elif command in (b"SELECT", b"EXAMINE") and login:
            box = _mailbox(login)
            selected = login
            sock.sendall(b"* FLAGS (\\Seen)\r\n* %d EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1] UIDs valid\r\n"
                         b"* OK [UIDNEXT %d] next\r\n%s OK [READ-WRITE] %s completed\r\n"
                         % (len(box), len(box) + 1, tag, command))
        elif command == b"FETCH" and selected:
            sequence, _, items = args.partition(b" ")
            box = _mailbox(selected)
            for number in _numbers(sequence, len(box)):
                sock.sendall(_fetch_response(number, box[number - 1], items.upper()))
            sock.sendall(tag + b" OK FETCH completed\r\n")
        elif command == b"SEARCH" and selected:
            numbers = b" ".join(b"%d" % n for n in range(1, len(_mailbox(selected)) + 1))
            sock.sendall(b"* SEARCH " + numbers + b"\r\n" + tag + b" OK SEARCH completed\r\n")
        elif command in (b"NOOP", b"CHECK", b"CLOSE", b"EXPUNGE"):
            sock.sendall(tag + b" OK " + command + b" completed\r\n")
        elif command == b"LOGOUT":
            sock.sendall(b"* BYE demo backend\r\n" + tag + b" OK LOGOUT completed\r\n")
            return
        else:
            sock.sendall(tag + b" BAD the demo backend knows LOGIN CAPABILITY LIST LSUB STATUS SELECT EXAMINE "
                         b"FETCH SEARCH UID NOOP CHECK CLOSE EXPUNGE LOGOUT\r\n")


def _numbers(sequence, count):
    """The message numbers of an IMAP sequence set such as ``1``, ``2:4``, ``1:*`` or ``1,3``."""
    numbers = []
    for part in sequence.split(b","):
        first, _, last = part.partition(b":")
        try:
            low = count if first == b"*" else int(first)
            high = low if not last else (count if last == b"*" else int(last))
        except ValueError:
            continue
        low, high = min(low, high), max(low, high)
        numbers.extend(n for n in range(max(low, 1), min(high, count) + 1) if n not in numbers)
    return numbers


def _fetch_response(number, message, items):
    """One ``* N FETCH (...)`` with the items clients ask for most; the whole message for any body item."""
    parts = []
    if b"UID" in items:
        parts.append(b"UID %d" % number)
    if b"FLAGS" in items or b"ALL" in items or b"FAST" in items:
        parts.append(b"FLAGS (\\Seen)")
    if b"SIZE" in items or b"ALL" in items or b"FAST" in items:
        parts.append(b"RFC822.SIZE %d" % len(message))
    if b"HEADER" in items:
        header = message.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        parts.append(b"BODY[HEADER] {%d}\r\n%s" % (len(header), header))
    elif b"BODY" in items or b"RFC822" in items.replace(b"RFC822.SIZE", b""):
        name = b"RFC822" if b"RFC822" in items.replace(b"RFC822.SIZE", b"") else b"BODY[]"
        parts.append(b"%s {%d}\r\n%s" % (name, len(message), message))
    if not parts:
        parts.append(b"UID %d" % number)
    return b"* %d FETCH (%s)\r\n" % (number, b" ".join(parts))


def _imap_argument(args, lines, sock):
    """The login of `LOGIN {n}` as mailproxy sends it: literal, continuation, literal, continuation."""
    if args.startswith(b"{") and args.endswith(b"}"):
        sock.sendall(b"+ go ahead\r\n")
        user_line = next(lines, b"")
        size = int(args[1:-1].rstrip(b"+"))
        user, tail = user_line[:size], user_line[size:].strip()
        if tail.startswith(b"{"):
            sock.sendall(b"+ go ahead\r\n")
            next(lines, b"")
        return user
    return args.split(b" ")[0].strip(b'"')


def pop3_session(sock, _address):
    sock.sendall(b"+OK mailproxy DEMO backend ready\r\n")
    login = None
    for line in _lines(sock):
        command, _, args = line.partition(b" ")
        command = command.upper()
        if command == b"USER":
            login = args.decode("utf-8", "replace")
            sock.sendall(b"+OK\r\n")
        elif command == b"PASS" and login:
            sock.sendall(b"+OK logged in\r\n")
        elif command == b"STAT" and login:
            box = _mailbox(login)
            sock.sendall(b"+OK %d %d\r\n" % (len(box), sum(map(len, box))))
        elif command == b"LIST" and login:
            box = _mailbox(login)
            listing = b"".join(b"%d %d\r\n" % (n, len(m)) for n, m in enumerate(box, 1))
            sock.sendall(b"+OK\r\n" + listing + b".\r\n")
        elif command == b"UIDL" and login:
            listing = b"".join(b"%d demo-%d\r\n" % (n, n) for n in range(1, len(_mailbox(login)) + 1))
            sock.sendall(b"+OK\r\n" + listing + b".\r\n")
        elif command == b"RETR" and login and args.isdigit() and 0 < int(args) <= len(_mailbox(login)):
            message = _mailbox(login)[int(args) - 1]
            stuffed = b"\r\n".join(b"." + l if l.startswith(b".") else l for l in message.split(b"\r\n"))
            sock.sendall(b"+OK\r\n" + stuffed.rstrip(b"\r\n") + b"\r\n.\r\n")
        elif command == b"NOOP":
            sock.sendall(b"+OK\r\n")
        elif command == b"QUIT":
            sock.sendall(b"+OK bye\r\n")
            return
        else:
            sock.sendall(b"-ERR the demo backend knows little\r\n")


def smtp_session(sock, _address):
    sock.sendall(b"220 demo.invalid ESMTP mailproxy DEMO backend\r\n")
    recipients = []
    lines = _lines(sock)
    for line in lines:
        command = line[:4].upper()
        if command in (b"EHLO", b"HELO"):
            sock.sendall(b"250-demo.invalid\r\n250-XCLIENT ADDR LOGIN NAME HELO\r\n250 AUTH PLAIN\r\n")
        elif line[:7].upper() == b"XCLIENT":
            sock.sendall(b"220 demo.invalid ESMTP mailproxy DEMO backend\r\n")
        elif command == b"AUTH":
            sock.sendall(b"235 2.7.0 Authentication successful\r\n")
        elif command == b"MAIL":
            recipients = []
            sock.sendall(b"250 2.1.0 Ok\r\n")
        elif command == b"RCPT":
            address = line.partition(b"<")[2].partition(b">")[0]
            recipients.append(address.decode("utf-8", "replace"))
            sock.sendall(b"250 2.1.5 Ok\r\n")
        elif command == b"DATA" and recipients:
            sock.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            body = []
            for data_line in lines:
                if data_line == b".":
                    break
                body.append(data_line[1:] if data_line.startswith(b"..") else data_line)
            for recipient in recipients:
                _mailbox(recipient).append(b"\r\n".join(body) + b"\r\n")
            sock.sendall(b"250 2.0.0 Ok: queued\r\n")
            recipients = []
        elif command in (b"RSET", b"NOOP"):
            sock.sendall(b"250 2.0.0 Ok\r\n")
        elif command == b"QUIT":
            sock.sendall(b"221 2.0.0 Bye\r\n")
            return
        else:
            sock.sendall(b"502 5.5.2 the demo backend knows little\r\n")


def _address(text):
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mailproxy-demo-backend", description=__doc__.split("\n\n")[0])
    parser.add_argument("--imap", default="127.0.0.1:1143")
    parser.add_argument("--pop3", default="127.0.0.1:1110")
    parser.add_argument("--smtp", default="127.0.0.1:1025")
    args = parser.parse_args(argv)
    servers = [
        StreamServer(_address(args.imap), imap_session),
        StreamServer(_address(args.pop3), pop3_session),
        StreamServer(_address(args.smtp), smtp_session),
    ]
    for server in servers:
        server.start()
    sys.stderr.write("mailproxy DEMO backend: imap %s, pop3 %s, smtp %s\n" % (args.imap, args.pop3, args.smtp))
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
