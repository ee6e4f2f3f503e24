"""User-facing errors: one line that names the problem and the fix."""


class UserError(Exception):
  """Bad input from the user (config, data, checkpoint). The CLIs print it as one line and exit 1."""


class ConfigError(UserError):
  """A config key or value is wrong."""


class DataError(UserError):
  """A dataset or image folder is missing, empty or unreadable."""


class CheckpointError(UserError):
  """A checkpoint is missing, corrupt or belongs to a different model."""
