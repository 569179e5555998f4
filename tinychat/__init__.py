"""tinychat: a local chat inference engine for 4-bit AWQ language models."""

__version__ = "0.1.0"
