"""`python -m qopt`: the same as the `qopt` command."""
import sys

from .cli import main

sys.exit(main())
