"""llmsup as a newer release would be: this very code, one state format ahead.

    python tests/fakes/newer_llmsup.py up -f models.yaml

For tests of upgrades: a daemon of a newer state format must adopt what an older
one left running, and the older one must then refuse the directory (nothing
signalled). Only the format moves; what a newer release would change beyond it
cannot be known here.
"""

import sys

import llmsup.statedir as statedir
from llmsup.cli import main

statedir.FORMAT += 1
statedir.WRITTEN_BY = "llmsup 99.0.0"

if __name__ == "__main__":
    sys.exit(main())
