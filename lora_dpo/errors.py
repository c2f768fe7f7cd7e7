"""The project's own error types: a user mistake is reported as one clear line, not a traceback."""


class LoraDpoError(Exception):
    """Base class: the CLI prints these as `error: <message>` and exits 2."""


class ConfigError(LoraDpoError):
    """A config file or a `key=value` override is wrong (unknown key, wrong type, bad value)."""


class DataError(LoraDpoError):
    """Preference data cannot be read or has no usable pairs; names the file, line or field."""


class CacheError(LoraDpoError):
    """The reference cache is missing, corrupt, incomplete, or built for another reference."""


class TrainingInterrupted(LoraDpoError):
    """SIGINT/SIGTERM stopped training at a step boundary; a checkpoint was saved."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name
