"""What several commands share: the MODEL argument and its default."""
from __future__ import annotations

DEFAULT_MODEL_HELP = "checkpoint folder (default: the bundled model)"


def model_path(path: str | None) -> str:
    """The MODEL argument; none means the model that ships with qopt."""
    from ..bundled import bundled_model_dir

    return path if path else str(bundled_model_dir())
