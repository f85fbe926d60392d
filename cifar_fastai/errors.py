"The one exception the command line turns into a one-line message and a non-zero exit."

__all__ = ['CifarFastaiError']


class CifarFastaiError(Exception):
    "Bad input from the user (data, paths, settings, files): reported as one line, never a traceback."
