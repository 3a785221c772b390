"""`python -m stepnet`, which is how torchrun starts each process: `torchrun ... -m stepnet train`."""

import sys

from stepnet.cli import main

sys.exit(main())
