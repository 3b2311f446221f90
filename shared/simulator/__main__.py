"""`python -m shared.simulator`: same as `aiq simulate`."""

import sys

from shared.simulator import main

sys.exit(main())
