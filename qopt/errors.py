"""Error types of qopt: each message names the file, tensor or field and what was expected."""
from __future__ import annotations


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


class OptionError(QoptError):
    """An error whose remedy is an option: the library spells it as its argument (`overwrite=True`), and the
    CLI re-spells the same message with its flag (`--force`) through `spelled`."""

    PLACEHOLDER = "{option}"

    def __init__(self, template: str, option: str = "") -> None:
        super().__init__(template.replace(self.PLACEHOLDER, option))
        self.template, self.option = template, option

    def spelled(self, option: str) -> OptionError:
        """The same error, naming `option` (e.g. a CLI flag) as the remedy."""
        return type(self)(self.template, option)


class OutputError(OptionError):
    """An output path would destroy the input or an existing model, or cannot be written at all."""


class ResumeError(OptionError, ValueError):
    """A fine-tuning output folder holds a checkpoint of a different run (data, settings or base model)."""


class HubError(QoptError):
    """A model named by its Hub id could not be resolved, reached or downloaded; the message names the repo."""


class HubOfflineError(HubError):
    """Downloads are off (or the Hub is unreachable) and the cache does not hold the model."""


class HubAccessError(HubError):
    """The repo does not exist, is gated, or the token does not give access to it."""


class DownloadError(HubError):
    """A shard arrived truncated, failed its checksum, or could not be written."""
