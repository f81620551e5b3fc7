"""``python -m gastrolens.cli``: the same as the ``gastrolens`` command."""

import sys

from gastrolens.cli import main

sys.exit(main())
