"""`python -m local_stack` (`task up`)."""

import sys

from local_stack.launcher import main

sys.exit(main())
