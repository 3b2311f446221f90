"""`python -m devkit.simulator`: same as `aiq simulate`."""

import sys

from devkit.simulator import main

sys.exit(main())
