"""``python -m forge`` runs the ``forge`` command line."""

import sys

from forge.cli import main

sys.exit(main())
