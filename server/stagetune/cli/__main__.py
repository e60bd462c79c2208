"""``python -m stagetune.cli``: the same as the ``stagetune`` command."""

import sys

from stagetune.cli.main import main

sys.exit(main())
