"""Errors that reach users as one line, never as a traceback."""


class CheckpointError(ValueError):
    """A checkpoint or artifact on disk is unusable; the message names the file and the cause."""
