"""What the fuzz tests (tests/test_fuzz_*.py) share: their hypothesis settings and the
hostile values they draw.

In CI every fuzz test runs a fixed, small number of derandomized examples (the same ones
on every run, no example database), so the files stay within their time budget and never
fail by chance. To search much longer, with fresh random examples and hypothesis' example
database remembering any failure found::

    HYPOTHESIS_PROFILE=long pytest tests/test_fuzz_parsers.py tests/test_fuzz_endpoints.py

``long`` runs LONG_FACTOR times as many examples per test.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

LONG_FACTOR = 25
settings.register_profile(
    "fuzz-ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = "long" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "fuzz-ci"


def fuzz(examples: int, *, app: bool = False) -> settings:
    """Settings for one fuzz test: ``examples`` in CI, LONG_FACTOR times more in ``long``.

    ``app``: the test takes the app's function-scoped fixtures, built once for the test
    and shared by its examples on purpose (each example checks only what it changed), so
    hypothesis' warning about function-scoped fixtures does not apply."""
    count = examples * LONG_FACTOR if PROFILE == "long" else examples
    checks = list(settings.get_profile(PROFILE).suppress_health_check)
    if app:
        checks.append(HealthCheck.function_scoped_fixture)
    return settings(settings.get_profile(PROFILE), max_examples=count, suppress_health_check=checks)


# -- Hostile values ----------------------------------------------------------------------

# Characters that have broken parsers before or might: line and paragraph separators,
# bidi overrides, zero-width joiners, a byte-order mark, NUL and other controls, Markdown
# and YAML/TOML punctuation, non-ASCII digits (int() and \d take them), a Kelvin sign
# (lower-cases to "k"), an emoji, and the replacement character; with a few letters so
# that words form.
SPECIAL = (
    "\x00\t\n\r\x0b\x0c\x1b\x7f\x85\u2028\u2029\u202e\u2066\u200d\u200b\ufeff\ufffd"
    "\u00a0\u0661\u0662\u00b2\u2163\uff11\u212a\u0130\U0001f600"
    "`~@#/\\<>&*_[](){}!|:;,.'\"-=+%$^? aZ09\u00e9\u4e2d"
)
# Halves of UTF-16 pairs, alone: only a JSON or YAML escape such as \ud800 carries them.
SURROGATES = "\ud800\udbff\udc00\udfff"


def text(max_size: int = 40, *, surrogates: bool = False) -> st.SearchStrategy[str]:
    """Any Unicode text, or text made of the characters above (separate alphabets: one
    mixed alphabet makes generation several times slower)."""
    special = SPECIAL + SURROGATES if surrogates else SPECIAL
    return st.text(max_size=max_size) | st.text(st.sampled_from(special), max_size=max_size)


def json_values(*, surrogates: bool = True) -> st.SearchStrategy[Any]:
    """Any JSON value, small, with hostile strings and numbers at the edges."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 10**30])
        | st.floats(allow_nan=False, allow_infinity=False)
        | text(20, surrogates=surrogates)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(text(10, surrogates=surrogates), inner, max_size=4)
        ),
        max_leaves=8,
    )


def wrong_values(*, surrogates: bool = True) -> st.SearchStrategy[Any]:
    """What a field may be replaced with: other types, empty and huge values."""
    return st.one_of(
        st.sampled_from([None, True, False, 0, -1, 1.5, "", [], {}, "x" * 5000, 10**20]),
        json_values(surrogates=surrogates),
    )


def dumps(value: Any) -> bytes:
    """JSON as a client would send it; lone surrogates travel as \\udxxx escapes."""
    return json.dumps(value).encode()


# Raw bodies that are not, or not quite, JSON.
RAW_BODIES = st.sampled_from(
    [
        b"",
        b" ",
        b"{",
        b"[",
        b"null",
        b"0",
        b'"x"',
        b"[]",
        b"{}",
        b"\xff\xfe{}",
        b"\xef\xbb\xbf{}",  # a byte-order mark
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": 1e999}',
        b'{"a": -0.0}',
        b'{"a": 1, "a": 2}',
        b'{"a": "\\ud800"}',
        b'{"\\udfff": 1}',
        b'{"a": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8: not UTF-8
        b"[" * 2000 + b"]" * 2000,  # deeper than Python's recursion limit, under 4 KiB
        b"[" * 100_000,
        b"1" * 5000,
        b"{}" + b" " * 10 + b"{}",
    ]
)
