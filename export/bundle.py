"""The bundle CLI, ``python -m export.bundle`` (export/coreml/bundle.py does the work)."""
from .coreml.bundle import main

if __name__ == "__main__":
    main()
