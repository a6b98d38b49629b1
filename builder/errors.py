"""The one error type every user-facing failure is raised as.

Its message is a single line that says what was wrong and where; the CLI prints it
as ``rackboot: error: <message>`` and exits with ``exit_code``.
"""


class RackbootError(Exception):
    exit_code = 1

    def __init__(self, message: str):
        # One line, always: multi-line messages are a bug in the raiser.
        super().__init__(" ".join(message.split("\n")))


class ConfigError(RackbootError):
    """The config file is wrong: exit status 2, like a usage error."""

    exit_code = 2
