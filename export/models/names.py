"""Architecture names and their modes, importable without torch (task generation reads these)."""
ARCHITECTURE_NAMES = ("student", "judge", "hf-causal-lm")
ARCHITECTURE_MODES = {"student": ("prefill", "decode"), "judge": ("prefill",), "hf-causal-lm": ("prefill", "decode")}
DEMO_ARCHITECTURES = ("student", "judge")  # those with a deterministic demo checkpoint (checkpoint = "demo")
ARCHITECTURE_TOOLS = {"hf-causal-lm": ("transformers",)}  # besides torch: packages whose version changes the export


def module_name(architecture: str) -> str:
    """The architecture's module under export/models (its code digest reads that file)."""
    return architecture.replace("-", "_")
