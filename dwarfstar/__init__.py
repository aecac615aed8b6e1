"""dwarfstar: a Python inference engine for DeepSeek V4 Flash GGUF files (ds4 layout)."""

__version__ = "0.1.0"
