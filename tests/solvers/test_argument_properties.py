"""Property-based checks (hypothesis) of the solvers' argument validators."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neurohybrid.errors import InputError
from neurohybrid.solvers.cli import output_times
from neurohybrid.solvers.glioma import stable_dt
from neurohybrid.solvers.stroke import RK4_STABILITY, XUE2021, simulate_tissue_death

positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)


@given(dmax=st.floats(min_value=0, max_value=1e4), rho=st.floats(min_value=0, max_value=10),
       spacing=st.tuples(positive, positive, positive))
def test_glioma_step_is_positive_and_inside_the_explicit_limit(dmax, rho, spacing):
    dt = stable_dt(dmax, spacing, rho)
    assert dt > 0
    rate = 2.0 * dmax * sum(1.0 / h**2 for h in spacing)
    # inf only when no limit is representable: nothing moves, or so little (a subnormal dmax
    # or rho) that the limit overflows
    limits = ([0.9 / rate] if rate > 0 else []) + ([0.05 / rho] if rho > 0 else [])
    assert math.isfinite(dt) == math.isfinite(min(limits, default=math.inf))
    if math.isfinite(dt):
        assert dt * rate <= 0.9 * (1 + 1e-12)
        assert dt * rho <= 0.05 * (1 + 1e-12)


@given(bad=st.one_of(st.floats(max_value=0), st.just(math.nan)))
def test_glioma_step_refuses_invalid_spacing(bad):
    with pytest.raises(InputError):
        stable_dt(1.0, (1.0, bad, 1.0), 0.1)


@given(years=st.floats(min_value=1e-3, max_value=100), dt=st.floats(min_value=1e-2, max_value=50))
def test_output_times_start_at_zero_end_at_years_and_increase(years, dt):
    t = output_times(years, dt)
    assert t[0] == 0 and math.isclose(t[-1], years, rel_tol=1e-9, abs_tol=1e-9)
    assert np.all(np.diff(t) > 0)
    assert np.all(np.diff(t) <= dt * (1 + 1e-9))


@settings(max_examples=30, deadline=None)
@given(dt=st.floats(min_value=1.0, max_value=5000.0))
def test_stroke_integrator_never_steps_beyond_stability(dt):
    stable = dt * XUE2021["kb"] <= RK4_STABILITY
    if stable:
        dead = simulate_tissue_death(np.array([5.0, 20.0, 56.0]), hours=6.0, dt_s=dt)["dead"]
        assert np.all(np.isfinite(dead)) and np.all((dead >= 0) & (dead <= 1))
    else:
        with pytest.raises(InputError, match="stability"):
            simulate_tissue_death(np.array([5.0]), hours=6.0, dt_s=dt)
