"""``python -m branchy_client``: the ``branchy`` command line."""

import sys

from branchy_client.cli import main

sys.exit(main())
