"""accelerate's device-map strategies, in a module without torch so the CLI's parsers can offer them."""
from __future__ import annotations

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
