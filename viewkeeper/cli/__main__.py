"""``python -m viewkeeper.cli``: the ``viewkeeper`` command."""

import sys

from viewkeeper.cli import main

sys.exit(main())
