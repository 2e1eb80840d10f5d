"""Bad input gets a clear ValueError/TypeError naming the leaf path and the problem."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normjax as nj

PARAMS = {"layer": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}, "count": jnp.zeros((2, 2), jnp.int32)}


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), np.float32(-2)])
def test_max_value_not_positive_finite(bad):
    for make in (lambda: nj.max_norm(bad), lambda: nj.project_max_norm(PARAMS, bad)):
        with pytest.raises(ValueError, match="max_value"):
            make()


def test_max_value_not_scalar_or_number():
    with pytest.raises(TypeError, match="max_value"):
        nj.max_norm(jnp.ones(3))
    with pytest.raises(TypeError, match="max_value"):
        nj.max_norm("3")


def test_min_greater_than_max():
    with pytest.raises(ValueError, match=r"min_value \(2.0\) > max_value \(1.0\)"):
        nj.min_max_norm(2.0, 1.0)
    with pytest.raises(ValueError, match="min_value"):
        nj.project_min_max_norm(PARAMS, -0.5, 1.0)


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_rate_outside_unit_interval(rate):
    with pytest.raises(ValueError, match="rate"):
        nj.min_max_norm(0.5, 1.0, rate=rate)


@pytest.mark.parametrize("axis", [2, -3, (0, 5)])
def test_axis_out_of_range_names_leaf(axis):
    tx = nj.max_norm(1.0, axis=axis)
    with pytest.raises(ValueError, match=r"axis .* out of range for leaf 'layer/kernel' of shape \(4, 3\)"):
        tx.init(PARAMS)
    with pytest.raises(ValueError, match="'layer/kernel'"):
        nj.project_unit_norm(PARAMS, axis=axis)


def test_axis_repeated_and_non_int():
    with pytest.raises(ValueError, match="repeats an axis for leaf 'layer/kernel'"):
        nj.project_max_norm(PARAMS, 1.0, axis=(0, -2))
    with pytest.raises(TypeError, match="axis="):
        nj.project_max_norm(PARAMS, 1.0, axis=(0.5,))


def test_vector_leaf_with_default_axis_names_leaf():
    with pytest.raises(ValueError, match="'layer/bias' has shape \\(3,\\)"):
        nj.project_max_norm(PARAMS, 1.0, where="layer")


def test_mask_structure_mismatch():
    with pytest.raises(ValueError, match="where= mask does not match the structure of params"):
        nj.max_norm(1.0, where={"layer": True}).init(PARAMS)
    with pytest.raises(ValueError, match="does not match"):
        nj.project_max_norm(PARAMS, 1.0, where={"layer": {"kernel": True}, "count": False, "extra": True})


def test_mask_with_non_bool_entry():
    with pytest.raises(TypeError, match="mask entry at 'layer/kernel'"):
        nj.project_max_norm(PARAMS, 1.0, where={"layer": {"kernel": "yes", "bias": False}, "count": False})


def test_non_float_leaf_selected_explicitly():
    with pytest.raises(TypeError, match="'count' .*int32.* not floating point"):
        nj.max_norm(1.0, where="count").init(PARAMS)
    with pytest.raises(TypeError, match="'count'"):
        nj.project_max_norm(PARAMS, 1.0, where=lambda p, x: x.ndim == 2)
    # with where=None an int leaf is simply not selected
    assert nj.project_max_norm(PARAMS, 1.0)["count"] is PARAMS["count"]


def test_errors_raised_at_trace_time_not_nan():
    good = {"layer": {"kernel": jnp.ones((2, 2, 2))}}
    tx = optax.chain(optax.sgd(1.0), nj.max_norm(1.0, axis=2))
    state = tx.init(good)
    with pytest.raises(ValueError, match="'layer/kernel'"):
        jax.jit(lambda p: tx.update(p, state, p))({"layer": {"kernel": jnp.ones((2, 2))}})
    with pytest.raises(ValueError, match="'layer/kernel'"):
        jax.jit(lambda p: nj.project_max_norm(p, 1.0, axis=3))(good)
