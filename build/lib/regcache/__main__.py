"""`python -m regcache`: the `regcache` command."""

import sys

from regcache.ops.cli import main

sys.exit(main())
