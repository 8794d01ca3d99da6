"""The error type for bad input: a flag, a path, a checkpoint or data that the user can fix.

Entry points report a ``UserError`` as one ``error:`` paragraph that names the flag or file, the
problem and the fix, without a traceback; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; the message names the flag or file, what is wrong and what to do."""
