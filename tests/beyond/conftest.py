"""Beyond nginx (issue 13): certificates by SNI, per-session SMTP backend auth, client id, auth cache."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
