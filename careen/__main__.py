"""`python -m careen`: the command line, for child processes that need this interpreter."""

import sys

from careen.cli import main

sys.exit(main())
