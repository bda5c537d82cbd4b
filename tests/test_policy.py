"""Policy validation, QStash's Flow-Control-Value grammar, rate strings and key validation."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.errors import InvalidFlowControl
from gateway.policy import MAX_KEY_LENGTH, Policy, parse_flow_control_value, parse_rate, validate_key


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("parallelism=3, rate=10, period=1s", Policy(parallelism=3, rate=10, period=1.0)),
        ("parallelism=3,rate=10,period=1s", Policy(parallelism=3, rate=10, period=1.0)),
        ("period=1s, rate=10, parallelism=3", Policy(parallelism=3, rate=10, period=1.0)),
        ("  rate = 10 ,parallelism= 3  ", Policy(parallelism=3, rate=10)),
        ("parallelism=5", Policy(parallelism=5)),
        ("rate=100, period=1m", Policy(rate=100, period=60.0)),
        ("rate=100, period=1h30m", Policy(rate=100, period=5400.0)),
        ("rate=7, period=500ms", Policy(rate=7, period=0.5)),
        ("rate=7, period=60", Policy(rate=7, period=60.0)),  # a bare integer is seconds
        ("rate=1, period=7d", Policy(rate=1, period=7 * 86400.0)),
        ("Parallelism=2, RATE=4", Policy(parallelism=2, rate=4)),
    ],
)
def test_flow_control_values(value: str, expected: Policy) -> None:
    assert parse_flow_control_value(value) == expected


def test_value_applies_on_top_of_a_base_policy() -> None:
    base = Policy(parallelism=2, rate=50, period=10.0, max_waiting=7, max_wait=3.0)
    assert parse_flow_control_value("rate=5", base) == Policy(2, 5, 10.0, 7, 3.0)
    assert parse_flow_control_value("parallelism=9, period=2s", base) == Policy(9, 50, 2.0, 7, 3.0)


@pytest.mark.parametrize(
    ("value", "field", "shown"),
    [
        # BAD_INPUTS.md item 13, each naming the field and the bad value
        ("parallelism=0", "parallelism", '"0"'),
        ("rate=-1", "rate", '"-1"'),
        ("rate=ten", "rate", '"ten"'),
        ("rate=1, period=10x", "period", '"10x"'),
        ("rate=1, period=8d", "period", '"8d"'),
        ("foo=1", "foo", "foo"),
        # more of the same kind
        ("parallelism=1.5", "parallelism", '"1.5"'),
        ("parallelism=+3", "parallelism", '"+3"'),
        ("parallelism=", "parallelism", '""'),
        ("parallelism=3 4", "parallelism", '"3 4"'),
        ("parallelism=٣", "parallelism", '"٣"'),
        ("parallelism=9999999999999", "parallelism", '"9999999999999"'),
        ("rate=0", "rate", '"0"'),
        ("rate=1e3", "rate", '"1e3"'),
        ("rate=1, period=0", "period", '"0"'),
        ("rate=1, period=0s", "period", '"0s"'),
        ("rate=1, period=604801", "period", '"604801"'),
        ("rate=1, period=1.5s", "period", '"1.5s"'),
        ("rate=1, period=-1s", "period", '"-1s"'),
        ("rate=1, period=²", "period", "²"),
        ("rate=1, period=\u0661s", "period", "\u0661s"),
        ("rate=1 period=1s", "rate", "1 period=1s"),
    ],
)
def test_malformed_values_name_field_and_value(value: str, field: str, shown: str) -> None:
    with pytest.raises(InvalidFlowControl) as caught:
        parse_flow_control_value(value)
    assert caught.value.code == "invalid_flow_control"
    assert caught.value.status == 400
    assert field in caught.value.message
    assert shown in caught.value.message


@pytest.mark.parametrize(("value", "shown"), [("period=10x", '"10x"'), ("period=8d", '"8d"')])
def test_bad_period_alone_names_its_value(value: str, shown: str) -> None:
    """BAD_INPUTS item 13 lists `period=10x` and `period=8d` as whole values: the answer must name the bad
    period, not only complain that rate/parallelism is missing."""
    with pytest.raises(InvalidFlowControl) as caught:
        parse_flow_control_value(value)
    assert "period" in caught.value.message
    assert shown in caught.value.message


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", ["empty"]),
        ("   ", ["empty"]),
        ("period=1s", ["period", "parallelism", "rate"]),
        ("parallelism=3, parallelism=4", ["parallelism", "twice"]),
        ("parallelism=3,", ['""']),
        ("parallelism", ['"parallelism"']),
        ("=3", ['"=3"']),
        ("parallelism=3; rate=4", ["parallelism", "3; rate=4"]),
    ],
)
def test_malformed_shapes(value: str, words: list[str]) -> None:
    with pytest.raises(InvalidFlowControl) as caught:
        parse_flow_control_value(value)
    for word in words:
        assert word in caught.value.message


pairs = st.fixed_dictionaries(
    {},
    optional={
        "parallelism": st.integers(1, 10**6),
        "rate": st.integers(1, 10**6),
        "period": st.sampled_from([("500ms", 0.5), ("1s", 1.0), ("90", 90.0), ("1h30m", 5400.0), ("7d", 604800.0)]),
    },
).filter(lambda fields: "parallelism" in fields or "rate" in fields)


@given(pairs, st.randoms(use_true_random=False), st.sampled_from(["", " ", "  "]))
def test_valid_values_in_any_order_and_spacing(fields: dict[str, object], rnd: object, space: str) -> None:
    items = list(fields.items())
    rnd.shuffle(items)  # type: ignore[attr-defined]
    text = ",".join(
        f"{space}{name}{space}={space}{value[0] if isinstance(value, tuple) else value}{space}" for name, value in items
    )
    period = fields.get("period")
    expected = Policy(
        parallelism=fields.get("parallelism"),  # type: ignore[arg-type]
        rate=fields.get("rate"),  # type: ignore[arg-type]
        period=period[1] if isinstance(period, tuple) else 1.0,
    )
    assert parse_flow_control_value(text) == expected


@given(st.text(max_size=60))
@example("rate=1, period=²")
@example("parallelism=1," * 5)
@example("rate=" + "9" * 400)
def test_parse_raises_only_invalid_flow_control(text: str) -> None:
    try:
        policy = parse_flow_control_value(text)
    except InvalidFlowControl as exc:
        assert exc.message
    else:
        assert policy.parallelism is not None or policy.rate is not None


@given(st.text(alphabet=st.sampled_from("parlelismtoda=, 0123456789smhd-x"), max_size=40))
def test_grammar_like_text_raises_only_invalid_flow_control(text: str) -> None:
    with contextlib.suppress(InvalidFlowControl):
        parse_flow_control_value(text)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"parallelism": 0}, "parallelism"),
        ({"parallelism": -3}, "parallelism"),
        ({"parallelism": True}, "parallelism"),
        ({"parallelism": 1.5}, "parallelism"),
        ({"rate": -1}, "rate"),
        ({"rate": "10"}, "rate"),
        ({"period": 0}, "period"),
        ({"period": 7 * 86400 + 1}, "period"),
        ({"max_waiting": -1}, "max_waiting"),
        ({"max_wait": -1}, "max_wait"),
        ({"max_wait": 8 * 86400}, "max_wait"),
    ],
)
def test_policy_validation(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidFlowControl, match=field):
        Policy(**changes)  # type: ignore[arg-type]


def test_policy_defaults_and_limits() -> None:
    policy = Policy()
    assert (policy.parallelism, policy.rate, policy.period) == (None, None, 1.0)
    assert Policy(rate=0).rate == 0  # rate=0 pauses admissions
    assert Policy(period=0.0004).period_ms == 1
    assert Policy(period=2.5).period_ms == 2500
    assert Policy(parallelism=2).replace(rate=3) == Policy(parallelism=2, rate=3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10/second", (10, 1.0)),
        ("100/minute", (100, 60.0)),
        ("100 per minute", (100, 60.0)),
        ("5/2 hours", (5, 7200.0)),
        ("1/day", (1, 86400.0)),
    ],
)
def test_parse_rate(text: str, expected: tuple[int, float]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["ten/second", "10/fortnight", "", "10", "/second"])
def test_parse_rate_refuses_nonsense(text: str) -> None:
    with pytest.raises(InvalidFlowControl) as caught:
        parse_rate(text)
    assert "rate" in caught.value.message
    assert f'"{text}"' in caught.value.message


@pytest.mark.parametrize(
    "key", ["tenant:42", "openai", "a", "k" * MAX_KEY_LENGTH, "ключ/ü", "with space", "{braces}", "a}{b", "x{"]
)
def test_valid_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("", ["empty"]),
        ("k" * (MAX_KEY_LENGTH + 1), ["257", "256"]),
        ("a\nb", ["control"]),
        ("a\x00b", ["control"]),
        ("tab\there", ["control"]),
        ("\x7f", ["control"]),
        ("a\u2028b", ["control"]),
    ],
)
def test_invalid_keys(key: str, words: list[str]) -> None:
    with pytest.raises(InvalidFlowControl) as caught:
        validate_key(key)
    assert caught.value.code == "invalid_flow_control"
    for word in words:
        assert word in caught.value.message


@given(st.text(max_size=300))
def test_validate_key_raises_only_invalid_flow_control(key: str) -> None:
    try:
        assert validate_key(key) == key
    except InvalidFlowControl:
        assert not key or len(key) > MAX_KEY_LENGTH or not key.isprintable()
