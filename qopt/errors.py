"""Error types of qopt: each message names the file, tensor or field and what was expected."""


class QoptError(Exception):
    """Base of every error qopt raises on purpose; the CLI prints these as one line."""


class ConfigError(QoptError, ValueError):
    """A config.json field is missing, has the wrong type or a nonsensical value."""


class CheckpointError(QoptError):
    """A checkpoint folder, shard, index or tensor is missing, corrupt or does not match the config."""


class TokenizerError(QoptError):
    """Tokenizer files are missing or unreadable."""


class PlanError(QoptError):
    """The model cannot be placed within the given memory budget."""


class GenerationError(QoptError, ValueError):
    """Bad generation arguments (sampling parameters, lengths, prompts)."""


class AdapterError(QoptError):
    """A LoRA adapter does not match the base model or is malformed."""


class NumericsError(QoptError):
    """A forward pass produced NaN or inf; the message names the first layer where it appeared."""
