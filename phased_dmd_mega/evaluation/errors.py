"""The error of ``phased-dmd evaluate``, raised by every stage of the command."""


class EvaluationError(ValueError):
    """Bad input to evaluate (a missing weights path, a sample folder that is not what
    ``phased-dmd sample`` writes); the message names the option or file at fault. The CLI reports
    it in one line, exit status 1, before anything is written."""
