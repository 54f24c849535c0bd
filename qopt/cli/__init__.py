"""The `qopt` command: argument parsing and one-line errors only; the work lives in the library."""
from .main import main

__all__ = ["main"]
