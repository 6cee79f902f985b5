"""The lexer: words, quotes and escapes, comments, terminators, and the line each statement ends on."""

import pytest

from mailproxy.conf.lexer import ConfigError, statements


def parse(text, file="/c.conf"):
    return [(s.args, s.line, s.end) for s in statements(text, file)]


def test_words_blocks_and_lines():
    assert parse("events {\n}\nmail {\n  server_name  a.example ;\n}\n") == [
        (("events",), 1, "{"), ((), 2, "}"), (("mail",), 3, "{"), (("server_name", "a.example"), 4, ";"),
        ((), 5, "}"), ((), 6, "")]


def test_statement_line_is_where_it_ends():
    assert parse("listen\n  127.0.0.1:143\n  ssl\n;")[0] == (("listen", "127.0.0.1:143", "ssl"), 4, ";")


def test_comments_only_at_word_start():
    assert parse("a b#c; # d;\n e;")[:2] == [(("a", "b#c"), 1, ";"), (("e",), 2, ";")]


def test_quotes_and_escapes():
    assert parse(r'''a "x y" 'p;q' "q\"uote" 'it\'s' "t\tn\n" "\d" "";''')[0][0] == (
        "a", "x y", "p;q", 'q"uote', "it's", "t\tn\n", "\\d", "")


def test_unquoted_escape_and_braces_inside_words():
    # nginx 1.22.1: `xclient a\ b;` -> invalid value "a\ b": an escaped blank joins the word, backslash kept.
    assert parse(r"a b\ c d} ${x};")[0][0] == ("a", "b\\ c", "d}", "${x}")


def test_quoted_newlines_count():
    assert parse('a "x\ny";\nb;')[1] == (("b",), 3, ";")


@pytest.mark.parametrize("text, message", [
    (";", 'unexpected ";" in /c.conf:1'),
    ("{", 'unexpected "{" in /c.conf:1'),
    ("a }", 'unexpected "}" in /c.conf:1'),
    ('a "b"c;', 'unexpected "c" in /c.conf:1'),
    ('a "b"}', 'unexpected "}" in /c.conf:1'),
    ("a b", 'unexpected end of file, expecting ";" or "}" in /c.conf:1'),
    ('a "b\n\n', 'unexpected end of file, expecting ";" or "}" in /c.conf:3'),
])
def test_errors(text, message):
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert str(info.value) == message


def test_command_line_location():
    assert parse("daemon off;", None)[0] == (("daemon", "off"), 1, ";")
    with pytest.raises(ConfigError, match='^unexpected end of parameter, expecting ";" in command line$'):
        parse("daemon off", None)
