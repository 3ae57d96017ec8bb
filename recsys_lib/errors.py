"""The one exception family of the project, so callers can catch our failures by type."""


class RecsysError(Exception):
    """Base class: a message that names the file or parameter and says what to do."""


class DataError(RecsysError):
    """Bad or missing input data: unknown dataset, checksum mismatch, corrupt archive, bad file."""


class ConfigError(RecsysError):
    """A bad parameter, profile or override."""


class LeakageError(RecsysError):
    """Fitting code touched rows it may not learn from (see docs/PROTOCOL.md, "Who learns from what")."""


class PipelineError(RecsysError):
    """A notebook of the pipeline failed or an earlier stage's artefact is missing."""
