"""Errors a user can act on. Stage entry points print them as one line and exit non-zero."""


class PipelineError(Exception):
    """Base class: the message is meant for the user, without a traceback."""


class ParamsError(PipelineError):
    """params.yaml holds a value the stage cannot use."""


class DataError(PipelineError):
    """Input data is missing, too small or too damaged to go on."""
