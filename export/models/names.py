"""Architecture names and their modes, importable without torch (task generation reads these)."""
ARCHITECTURE_NAMES = ("student", "judge")
ARCHITECTURE_MODES = {"student": ("prefill", "decode"), "judge": ("prefill",)}
