"""Command-line pieces shared by ``vit_fast.train``, ``evaluate`` and ``predict``.

Argument types that say what they expected (argparse prints ``prog: error: argument --x: ...``),
and `usage_error` for mistakes argparse cannot see alone: one line on stderr, exit status 2,
before any work starts.
"""
import argparse
import math
import re
import sys


class UsageError(SystemExit):
    """A command-line mistake: exit status 2 (argparse's); ``str()`` is the message, already printed."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def usage_error(parser, message):
    """Print ``prog: error: message`` (one line, as argparse does) and exit with status 2."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    raise UsageError(message)


def _int_at_least(low, expected):
    """An argparse type: an int >= ``low``, else the error names what was ``expected``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def float_in(low, high=math.inf, low_open=False, high_open=True):
    """An argparse type: a finite float in [low, high) (ends open or closed as asked)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"expected a number in {lo}{low:g}, {high:g}{hi}, got {text!r}")
        return value
    return parse


DURATION_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def duration(text):
    """'600', '600s', '10m', '10min', '1h' -> seconds (a positive float)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", text.lower())
    if not match or match[2] not in DURATION_UNITS or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration in seconds or minutes (600, 600s, 10m, "
                                         f"10min), got {text!r}")
    return float(match[1]) * DURATION_UNITS[match[2]]
