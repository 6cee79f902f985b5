"""The differential harness's own readings (diff_streams.py), which its verdicts rest on."""

from diff_streams import imap_commands, session_records

LOG = (b"2026/12/07 16:00:00 [info] 1#0: *7 client 127.1.0.60:51589 connected to 127.0.0.1:25\n"
       b"2026/12/07 16:00:00 [info] 1#0: *7 client login failed: \"x\", login: \"slow1\"\n"
       b"2026/12/07 16:00:01 [info] 1#0: *9 client 127.1.0.52:51589 connected to 127.0.0.1:25\n"
       b"2026/12/07 16:00:01 [info] 1#0: *9 client sent too long command \"RCpt TO:<alice\"\n"
       b"2026/12/07 16:00:02 [info] 1#0: *11 client 127.1.0.60:51589 connected to 127.0.0.1:25\n")


def test_a_session_is_found_by_its_address_and_port_not_by_the_port_alone():
    # Dialogues have addresses of their own, and the kernel gives two of them the same port at times.
    assert session_records(LOG, "127.1.0.52", 51589) == [
        b"*9 client 127.1.0.52:51589 connected to 127.0.0.1:25",
        b"*9 client sent too long command \"RCpt TO:<alice\""]
    assert [record.split(b" ")[0] for record in session_records(LOG, "127.1.0.60", 51589)] == [b"*11"]
    assert session_records(LOG, "127.1.0.53", 51589) == []


def test_a_line_without_a_space_has_no_tag_and_an_empty_tag_is_its_own():
    commands = imap_commands(b"w-S3\n NOOP {2+}\r\nabc\r\nz LOGOUT\r\n")
    assert [(command.tag, len(command.literals)) for command in commands] == [(None, 0), (b"", 1), (b"z", 0)]
    assert commands[1].literals[0] == (b"2", b"+", b"ab", b"c")
