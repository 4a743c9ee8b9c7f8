"""``python -m course.data``: regenerate (or ``--check``) the shipped corpus."""

import sys

from course.data import main

sys.exit(main())
