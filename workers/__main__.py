"""``python -m workers``: run one worker process."""

import sys

from workers.main import main

sys.exit(main())
