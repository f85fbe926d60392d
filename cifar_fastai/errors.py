"The one exception the command line turns into a one-line message and a non-zero exit."

__all__ = ['CifarFastaiError']


class CifarFastaiError(Exception):
    "Bad input from the user (data, paths, settings, files): reported as one line, never a traceback."
    exit_code = 1

    def __init__(self, msg):
        super().__init__(msg)
        self.msg = msg

    # fastai rewrites the args of an exception raised in a callback ("Exception occured in `X` when calling
    # event `Y`: ..."): the message the user sees is kept apart from them.
    def __str__(self): return self.msg
