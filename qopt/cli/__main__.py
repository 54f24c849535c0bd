"""`python -m qopt.cli`: the same as the `qopt` command."""
import sys

from . import main

sys.exit(main())
