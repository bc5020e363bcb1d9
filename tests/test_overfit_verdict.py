"""The loss-curve classifier on synthetic curves: robust to noise, right about each shape."""

from __future__ import annotations

import numpy as np
import pytest

from nbtrouble._verdict import read_curve, swing_of

STEPS = 300


def _noisy(curve: np.ndarray, noise: float, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(curve * np.exp(rng.normal(0, noise, len(curve))))


def decaying(noise: float = 0.0, floor: float = 0.0) -> list[float]:
    steps = np.arange(STEPS)
    return _noisy(2.3 * np.exp(-steps / 40) + floor, noise)


@pytest.mark.parametrize("seed", range(5))
def test_mini_batch_wiggles_on_a_falling_curve_still_converge(seed: int) -> None:
    steps = np.arange(STEPS)
    curve = _noisy(2.3 * np.exp(-steps / 40), noise=0.3, seed=seed)
    assert read_curve(curve, nonnegative=True).verdict == "converged"


@pytest.mark.parametrize("seed", range(5))
def test_noise_on_a_plateau_is_not_oscillation(seed: int) -> None:
    curve = _noisy(np.full(STEPS, 1.1), noise=0.15, seed=seed)
    assert read_curve(curve, nonnegative=True).verdict == "plateaus"


def test_a_floor_well_above_zero_plateaus_and_a_slow_fall_is_still_falling() -> None:
    assert read_curve(decaying(noise=0.05, floor=0.5)).verdict == "plateaus"
    slow = list(2.3 * np.exp(-np.arange(STEPS) / 400))
    reading = read_curve(slow)
    assert reading.verdict == "plateaus" and reading.still_falling


def test_swings_by_several_times_oscillate() -> None:
    rng = np.random.default_rng(1)
    curve = list(0.5 * np.exp(rng.uniform(-1.2, 1.2, STEPS)))
    reading = read_curve(curve, nonnegative=True)
    assert reading.verdict == "oscillates" and "swinging between" in reading.summary


def test_rising_loss_goes_up_and_a_nonnegative_loss_below_zero_is_a_flipped_sign() -> None:
    assert read_curve(list(np.linspace(0.7, 2.0, STEPS))).verdict == "goes_up"
    below = read_curve(list(np.linspace(1.0, -40.0, STEPS)), nonnegative=True)
    assert below.verdict == "goes_up" and below.negative_unbounded
    # A loss of unknown kind may go a little negative (a likelihood); only an unbounded fall counts.
    settled = list(-0.5 + 1.5 * np.exp(-np.arange(STEPS) / 20))
    assert read_curve(settled).verdict != "goes_up"


def test_nonfinite_or_orders_of_magnitude_explode() -> None:
    assert read_curve([1.0, 2.0, float("nan")]).verdict == "explodes"
    assert read_curve([1.0, 0.9, 0.8], nonfinite_at=2).verdict == "explodes"
    spikes = [1.0] * 50 + [1e4] + [0.9] * 50
    assert read_curve(spikes).verdict == "explodes"


def test_empty_curve_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one loss"):
        read_curve([])


def _rising(start: float, end: float, noise: float, seed: int = 0) -> list[float]:
    return _noisy(np.linspace(start, end, 200), noise, seed)


@pytest.mark.parametrize("seed", range(3))
def test_a_small_steady_rise_goes_up_unless_weight_decay_explains_it(seed: int) -> None:
    curve = _rising(2.30, 2.34, noise=0.001, seed=seed)  # gradient ascent at a small lr
    reading = read_curve(curve, nonnegative=True)
    assert reading.verdict == "goes_up" and "rising steadily" in reading.summary, reading
    assert read_curve(curve, nonnegative=True, pulled_back=True).verdict == "plateaus"


@pytest.mark.parametrize("seed", range(5))
def test_noise_around_a_tiny_drift_is_not_a_trend(seed: int) -> None:
    # Dropout-like wiggles of 5% around a drift of 0.1%: the noise explains the drift.
    assert read_curve(_rising(2.300, 2.302, noise=0.05, seed=seed)).verdict == "plateaus"


def test_a_rise_that_turns_back_is_not_going_up() -> None:
    steps = np.arange(STEPS)
    # Weight decay's early rise, then a fall.
    hump = list(2.30 + 0.01 * np.sin(np.pi * steps / STEPS))
    assert read_curve(hump, nonnegative=True).verdict == "plateaus"


def test_a_loss_that_rewards_wrong_predictions_goes_up_when_it_falls() -> None:
    falling = list(np.linspace(-2.30, -2.35, STEPS))
    reading = read_curve(falling, sign_flipped=True)
    assert reading.verdict == "goes_up" and reading.sign_flipped
    assert read_curve(falling).verdict == "plateaus"  # unknown sign: a small fall tells nothing
    assert read_curve([-2.3] * STEPS, sign_flipped=True).verdict == "plateaus"


def test_swing_of_repeated_losses_matches_the_oscillation_scale() -> None:
    assert swing_of([1.0, 1.0, 1.0]) == 0.0
    assert swing_of([0.5, 1.0, 2.0, 0.5, 2.0]) == pytest.approx(np.log(4.0))
    assert swing_of([1.0]) == 0.0
