"""mailproxy's command line with another session handler in its workers: the tests' entry point.

    python -m session_handler_master MODULE:FUNCTION -p PREFIX -c CONF [ARGS...]

The product runs mailproxy.session:handle, and reads no setting that could make it import anything
else; the tests' stand-in sessions (conftest.mini_imap_session, a handler that raises) come in here.
The handler stays in the command line, so a master that re-executes itself for an upgrade on the fly
(USR2) replays it.
"""

import sys

from mailproxy import cli, worker

if __name__ == "__main__":
    worker.DEFAULT_HANDLER = sys.argv.pop(1)
    sys.exit(cli.main())
