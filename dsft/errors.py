"""The exceptions dsft shows to users: the CLI prints them without a traceback and exits with exit_code."""


class DsftError(Exception):
    """A problem with the user's input (config, data, run directory) that they can fix.

    The message names where the problem is (file:line, config key path or CLI option) and
    what is allowed instead.
    """

    exit_code = 2


class TrainingInterrupted(DsftError):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; the message says how to resume."""

    # EX_TEMPFAIL: a job scheduler may requeue the job, which then resumes.
    exit_code = 75


class TrainingDiverged(DsftError):
    """A non-finite loss or gradient stopped training before the optimizer applied it."""

    exit_code = 3


class RemoteCodeWarning(UserWarning):
    """model.trust_remote_code is on: Python code from a model repository will run on this machine."""
