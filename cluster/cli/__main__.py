"""``python -m cluster.cli``: the ``strata`` command."""

import sys

from cluster.cli.main import main

sys.exit(main())
