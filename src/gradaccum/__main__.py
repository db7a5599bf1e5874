"""``python -m gradaccum`` is the ``gradaccum`` command."""

import sys

from .cli import main

sys.exit(main())
