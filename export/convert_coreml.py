"""The seed's conversion CLI, ``python -m export.convert_coreml`` (export/coreml/convert.py does the work)."""
from .coreml.convert import main

if __name__ == "__main__":
    main()
