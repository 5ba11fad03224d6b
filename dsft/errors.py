"""The one exception type for user mistakes: the CLI prints it without a traceback."""


class DsftError(Exception):
    """A problem with the user's input (config, data, run directory) that they can fix.

    The message names where the problem is (file:line, config key path or CLI option) and
    what is allowed instead.
    """
