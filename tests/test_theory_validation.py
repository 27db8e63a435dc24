"""One set of input rules: the same bad budgets, problem or variant get the same ValueError, with the
same message in plain numbers, from ``theory.discrete.solve``, ``theory.gmm.solve`` and the toy
tier's ``check_budgets`` (all three call ``theory.validation``)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from theory import discrete, gmm
from theory.validation import check_budgets, plain

Q = np.array([0.5, 0.3, 0.2])
F = np.array([[0.2, 0.3, 0.5]])
NUMPY_REPR = re.compile(r"np\.\w+\(|array\(|dtype")


def _messages(problem, budgets, variant="likelihood") -> list[str]:
    """The ValueError message of each tier for one bad input (every tier must raise)."""
    from toy.problems import check_budgets as toy_check_budgets

    q, forget, _ = gmm.default_instance()
    m = len(budgets)
    calls = [
        lambda: discrete.solve(problem, Q, np.repeat(F, m, axis=0), budgets, variant=variant),
        lambda: gmm.solve(problem, q, forget * m, budgets, variant=variant),
        lambda: toy_check_budgets(problem, q, forget * m, budgets, variant),
    ]
    out = []
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        out.append(str(info.value))
    return out


@pytest.mark.parametrize("problem, budgets, variant, expected", [
    ("reverse_kl", [-0.5], "likelihood", "reverse_kl: budgets are KL thresholds and must be >= 0, got -0.5 at index 0"),
    ("forward_kl", [np.float64(-1e-3)], "likelihood", "forward_kl: budgets are KL thresholds and must be >= 0, "
                                                      "got -0.001 at index 0"),
    ("reverse_kl", [np.nan], "likelihood", "reverse_kl: budgets must be finite, got nan at index 0"),
    ("forward_kl", [np.inf], "likelihood", "forward_kl: budgets must be finite, got inf at index 0"),
    ("likelihood", [0.0], "likelihood", "likelihood: budgets[0] = 0 cannot be met: g_i >= 0 (likelihood variant), "
                                        "so E_p[g_i] >= 0 for every p and a budget must be > 0"),
    ("likelihood", [-0.1], "likelihood_ratio", "likelihood: budgets[0] = -0.1 cannot be met: g_i >= 0 "
                                               "(likelihood_ratio variant), so E_p[g_i] >= 0 for every p and a "
                                               "budget must be > 0"),
    ("likelihood", [0.1], "ratio", "likelihood: variant must be one of ('likelihood', 'log_likelihood', "
                                   "'likelihood_ratio'), got 'ratio'"),
    ("kl", [0.1], "likelihood", "problem must be one of ('reverse_kl', 'forward_kl', 'likelihood'), got 'kl'"),
])
def test_same_bad_input_same_message_from_every_tier(problem, budgets, variant, expected):
    assert _messages(problem, budgets, variant) == [expected] * 3


def test_budgets_of_the_wrong_shape_are_refused_alike():
    q, forget, _ = gmm.default_instance()
    from toy.problems import check_budgets as toy_check_budgets

    expected = "reverse_kl: budgets must have shape (1,), got (2,)"
    for call in (lambda: discrete.solve("reverse_kl", Q, F, [0.1, 0.2]),
                 lambda: gmm.solve("reverse_kl", q, forget, [0.1, 0.2]),
                 lambda: toy_check_budgets("reverse_kl", q, forget, [0.1, 0.2])):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == expected


@settings(max_examples=25, deadline=None)
@given(problem=st.sampled_from(["reverse_kl", "forward_kl"]), m=st.integers(1, 3), data=st.data(),
       value=st.floats(-1e6, -1e-12, allow_nan=False), as_numpy=st.booleans())
@example(problem="reverse_kl", m=2, data=None, value=-2.0, as_numpy=True)
def test_a_negative_kl_budget_is_refused_everywhere_with_its_index(problem, m, data, value, as_numpy):
    i = data.draw(st.integers(0, m - 1)) if data is not None else 1
    budgets = [0.5] * m
    budgets[i] = np.float64(value) if as_numpy else value
    if as_numpy:
        budgets = np.asarray(budgets)
    messages = _messages(problem, budgets)
    assert len(set(messages)) == 1
    msg = messages[0]
    assert msg == f"{problem}: budgets are KL thresholds and must be >= 0, got {value:.6g} at index {i}"
    assert not NUMPY_REPR.search(msg)


@pytest.mark.parametrize("q, match", [
    ([0.5, np.nan, 0.5], "reverse_kl: q must be finite, got nan at index 1"),
    ([0.5, -0.1, 0.6], "reverse_kl: q must be non-negative, got -0.1 at index 1"),
])
def test_discrete_messages_print_indices_as_plain_ints(q, match):
    with pytest.raises(ValueError) as info:
        discrete.solve("reverse_kl", q, F, [0.1])
    assert str(info.value) == match


def test_forget_entries_are_located_by_row_and_column_in_plain_ints():
    forget = np.array([[0.2, 0.3, 0.5], [0.5, 0.7, -0.2]])
    with pytest.raises(ValueError) as info:
        discrete.solve("reverse_kl", Q, forget, [0.1, 0.1])
    assert str(info.value) == "reverse_kl: forget must be non-negative, got -0.2 at index (1, 2)"


def test_log_likelihood_budgets_may_be_negative_and_kl_budgets_zero():
    # g_i = log q_i < 0: a negative LU budget is a real constraint, not an error
    np.testing.assert_array_equal(check_budgets("likelihood", [-1.5], 1, variant="log_likelihood"), [-1.5])
    np.testing.assert_array_equal(check_budgets("reverse_kl", 0.0, 1), [0.0])
    s = discrete.solve("likelihood", Q, F, [np.log(0.2) + 0.1 * np.log(1.5)], variant="log_likelihood")
    assert s.certificate in ("kkt", "cvxpy")


def test_plain_turns_numpy_scalars_into_python_numbers():
    assert repr(plain((np.int64(0), np.float64(0.5), np.array([1.0, 2.0])))) == "(0, 0.5, [1.0, 2.0])"
