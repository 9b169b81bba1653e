"""Request bodies are checked twice over: a compiled fast check, and jsonschema when the
fast one refuses. The two must agree, or the fast path would let through what the
documented schema refuses."""

from __future__ import annotations

from typing import Any

import fastjsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from app.api import build_route_table
from app.api.fleet import HEARTBEAT_BODY

ROUTES = [r for r in build_route_table().routes if r.request is not None]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
ids = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", fullmatch=True),
    st.text(max_size=140),
)
counts = st.one_of(st.integers(min_value=0, max_value=10**9), st.integers(), st.floats(), st.none())
heartbeats = st.fixed_dictionaries(
    {"runnerId": ids, "orgId": ids, "bootId": ids},
    optional={
        "buildId": st.one_of(st.none(), st.text(max_size=110), st.just("build-abc")),
        "runtimes": st.dictionaries(st.text(max_size=70), st.text(max_size=110), max_size=22),
        "sessions": st.fixed_dictionaries(
            {"started": counts, "failed": counts},
            optional={"disconnected": counts, "extra": json_values},
        ),
        "extra": json_values,
    },
)


def agree(schema: dict[str, Any], value: Any) -> None:
    fast = fastjsonschema.compile(schema)
    try:
        fast(value)
        fast_ok = True
    except fastjsonschema.JsonSchemaException:
        fast_ok = False
    assert fast_ok == Draft202012Validator(schema).is_valid(value), value


@settings(max_examples=400, deadline=None)
@given(heartbeats)
def test_the_fast_check_agrees_on_heartbeats(body: dict[str, Any]) -> None:
    agree(HEARTBEAT_BODY, body)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.operation_id)
@settings(max_examples=40, deadline=None)
@given(value=json_values)
def test_the_fast_check_agrees_on_any_json_for_every_route(route: Any, value: Any) -> None:
    assert route.request is not None
    agree(dict(route.request), value)
