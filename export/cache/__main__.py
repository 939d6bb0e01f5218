"""``python -m export.cache show|gc``."""
import sys

from .store import main

sys.exit(main())
