"""``python -m dfk8s.testing.fake_api``: the fake API server's command line."""

import sys

from dfk8s.testing.fake_api.server import main

sys.exit(main())
