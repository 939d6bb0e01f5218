"""The verification CLI, ``python -m export.verify_coreml`` (export/coreml/verify.py does the work)."""
from .coreml.verify import main

if __name__ == "__main__":
    main()
