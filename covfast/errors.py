"""Errors that reach users as one-line messages with a distinct exit code.

The CLI catches :class:`CovfastError` and prints ``covfast: error: <message>`` with no traceback,
then exits with :attr:`CovfastError.exit_code`.
"""

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_OUTPUT = 3
EXIT_INTERNAL = 1


class CovfastError(Exception):
    """Base class of the errors covfast reports to users without a traceback."""

    exit_code = EXIT_INTERNAL


class UsageError(CovfastError):
    """The command line or API call itself is wrong (exit code 2)."""

    exit_code = EXIT_USAGE


class _PathError(CovfastError):
    """An error about one file: the message is ``"<path>: <problem>"``."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable with its two arguments (errors come back from worker processes)
        return type(self), (self.path, self.problem)


class InputError(_PathError):
    """An input volume cannot be used: missing, unreadable, corrupt, wrong shape or values (exit code 3).

    The message names the file and the problem, e.g. ``"scan.nii.gz: truncated gzip stream"``.
    """

    exit_code = EXIT_BAD_INPUT


class OutputError(_PathError):
    """An output cannot be written (exit code 3); nothing partial is left behind."""

    exit_code = EXIT_OUTPUT


class ModelNotInstalledError(CovfastError):
    """A stage needs model weights that are not installed."""

    exit_code = EXIT_INTERNAL
