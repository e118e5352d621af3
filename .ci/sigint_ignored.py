"""Run a command with SIGINT ignored, as CI and job runners may start it.

    python .ci/sigint_ignored.py python -m pytest tests/transports/test_interrupt_and_main.py

A process started in the background by a non-interactive shell (``cmd &``)
inherits SIGINT ignored, and so do some job runners' children; the
disposition survives ``exec``, so the command starts exactly that way.
"""

import os
import shutil
import signal
import sys

if len(sys.argv) < 2:
    sys.exit(__doc__)
signal.signal(signal.SIGINT, signal.SIG_IGN)
program = shutil.which(sys.argv[1]) or sys.argv[1]
os.execv(program, sys.argv[1:])
