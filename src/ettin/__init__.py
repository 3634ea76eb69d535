"""ettin: paired encoder/decoder training stack."""

__version__ = "0.1.0"
