"""The one exception type for a user's mistake, so the command line can tell it from a bug.

Standard library only: every package may raise it without importing anything of ours.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake of the user's: a bad config, file or flag, a mismatch, a service that is not there.

    The message names what is wrong (the file, the field, the address) and, where there
    is one, the fix. The command line prints it as ``error: <message>`` and exits 2,
    without a traceback; anything that is not a UserError is a bug and keeps its traceback.

    Example::

        raise UserError(f"{path}: data.prepare.num_sample is not a prepare field; did you mean num_samples?")
    """
