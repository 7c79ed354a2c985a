"""rfdit.smoothness: the roughness measure on fields whose derivatives are known in closed form."""

import types

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

from rfdit.smoothness import observed_orders, roughness, roughness_by_t


class Field(eqx.Module):
    """v(x, t) = a·sin(ω·t) on every pixel (x enters only through its shape)."""

    a: float
    omega: float
    config: types.SimpleNamespace = eqx.field(static=True)

    def __call__(self, x, t, y):
        return jnp.zeros_like(x) + self.a * jnp.sin(self.omega * t)


@pytest.mark.parametrize("omega", [3.0, 300.0])
def test_roughness_of_a_sine_in_t(omega):
    model = Field(1.0, omega, types.SimpleNamespace(time_convention="rfdit", in_channels=1))
    x1 = np.zeros((2, 4, 4, 1), np.float32)
    figures = roughness(model, x1, np.zeros(2, np.int32), num_points=2001, t_range=(0.0, 1.0))
    # along t the field is sin(ωt): median |v| ≈ 1/√2-ish and |v''| = ω²|v|, up to the central difference's
    # relative error (ωh)²/12 (0.5 % at ω = 300, h = 5e-4) and the median of |sin| over a grid, which both see
    assert figures["d2v_over_v"] == pytest.approx(omega**2, rel=0.02)
    assert figures["dv_dt_rms"] / figures["v_rms"] == pytest.approx(omega, rel=0.2)


class Pole(eqx.Module):
    """v(x, t) = 1 / (1.1 - t): |v''| / |v| = 2 / (1.1 - t)², steepest at the data end, as a field that sharpens there."""

    config: types.SimpleNamespace = eqx.field(static=True)

    def __call__(self, x, t, y):
        return jnp.zeros_like(x) + 1.0 / (1.1 - t)


def test_roughness_by_t_finds_where_the_curvature_sits():
    model = Pole(types.SimpleNamespace(time_convention="rfdit", in_channels=1))
    x1 = np.zeros((2, 4, 4, 1), np.float32)
    profile = roughness_by_t(model, x1, np.zeros(2, np.int32))
    assert list(profile) == [f"{i / 10:g}-{(i + 1) / 10:g}" for i in range(10)]
    # the ratio rises monotonically in t, so each bin's median is its value at the bin's middle; the central
    # difference's relative error is h²/(1.1 - t)² (2e-4 at the last bin, h = 1/800); float32 round-off (up to
    # ~4e-7/h² ≈ 0.25 at one point) mostly cancels in the bin's median
    for i, value in enumerate(profile.values()):
        assert value == pytest.approx(2 / (1.1 - (i + 0.5) / 10) ** 2, rel=1e-2)


def test_observed_orders_are_log2_error_ratios():
    rows = [{"section": "grid", "solver": "heun", "num_steps": n, "rms_error": e}
            for n, e in ((16, 4e-3), (32, 1e-3), (64, 2.5e-4))]
    assert observed_orders(rows)["heun"] == pytest.approx([2.0, 2.0])
    assert observed_orders(rows)["midpoint"] == [None, None]


def test_sweep_passes_train_args_as_one_shell_line(tmp_path):
    from rfdit.smoothness import SweepConfig, time_scale_sweep

    seen = []

    class Stop(Exception):
        pass

    def train(argv):
        seen.append(argv)
        raise Stop

    cfg = SweepConfig(root=str(tmp_path), time_scales=(10.0,), seeds=(1,), train_args="--dequantize 1 --max_steps 8")
    with pytest.raises(Stop):
        time_scale_sweep(cfg, train=train)
    assert seen == [["--save_dir", str(tmp_path / "ts10-s1"), "--seed", "1", "--model.time_scale", "10",
                     "--overwrite", "1", "--dequantize", "1", "--max_steps", "8"]]
