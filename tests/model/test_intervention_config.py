"""Constructor validation of VHR / VAR / ZeroTuning (typed ConfigError naming the parameter and the value), defaults
that work on any model (VAR() on a 256-wide LLM like the shipped ``tiny``), and settings round trips."""

from __future__ import annotations

import math

import pytest
import torch

from taskmllm.errors import ConfigError
from taskmllm.model.interventions import VAR, VHR, ZeroTuning, default_tau
from taskmllm.model.mllm import TaskMLLM
from tests.conftest import tiny_config

BAD = [
    # (constructor, the parameter named in the message, the bad value as it appears in the message)
    (lambda: VHR(alpha="2"), "alpha", "'2'"),
    (lambda: VHR(alpha=float("nan")), "alpha", "nan"),
    (lambda: VHR(alpha=float("inf")), "alpha", "inf"),
    (lambda: VHR(alpha=1e30), "alpha", "1e+30"),
    (lambda: VHR(alpha=0), "alpha", "0"),
    (lambda: VHR(alpha=True), "alpha", "True"),
    (lambda: VHR(layers=5), "layers", "5"),
    (lambda: VHR(layers="12"), "layers", "'12'"),
    (lambda: VHR(layers=["a"]), "layers", "'a'"),
    (lambda: VHR(layers=[1.5]), "layers", "1.5"),
    (lambda: VHR(remove_outliers="yes"), "remove_outliers", "'yes'"),
    (lambda: VAR(tau=float("nan")), "tau", "nan"),
    (lambda: VAR(tau=-1), "tau", "-1"),
    (lambda: VAR(tau=0), "tau", "0"),
    (lambda: VAR(p=1.5), "p", "1.5"),
    (lambda: VAR(p="0.6"), "p", "'0.6'"),
    (lambda: VAR(rho=float("inf")), "rho", "inf"),
    (lambda: VAR(min_image_attention=-0.1), "min_image_attention", "-0.1"),
    (lambda: VAR(mode="oficial"), "mode", "'oficial'"),
    (lambda: VAR(sink_dims=[-1]), "sink_dims", "-1"),
    (lambda: VAR(sink_dims=7), "sink_dims", "7"),
    (lambda: VAR(layers=[0.5]), "layers", "0.5"),
    (lambda: ZeroTuning(gamma=0), "gamma", "0"),
    (lambda: ZeroTuning(gamma=float("nan")), "gamma", "nan"),
    (lambda: ZeroTuning(gamma=1e30), "gamma", "1e+30"),
    (lambda: ZeroTuning(gamma="2"), "gamma", "'2'"),
    (lambda: ZeroTuning(heads=[(1,)]), "heads", "(1,)"),
    (lambda: ZeroTuning(heads=[(1, -2)]), "head index", "-2"),
    (lambda: ZeroTuning(heads=[("a", 0)]), "heads", "'a'"),
    (lambda: ZeroTuning(heads=3), "heads", "3"),
    (lambda: ZeroTuning(gammas={(0, 1): -1.0}), "gamma of head (0, 1)", "-1.0"),
    (lambda: ZeroTuning(gammas=[[0, 1]]), "gammas", "[0, 1]"),
    (lambda: ZeroTuning(gammas={(0, 1): 2.0}, heads=[(0, 1)]), "either heads", ""),
]


@pytest.mark.parametrize("make,name,value", BAD, ids=[f"{n}={v}" for _, n, v in BAD])
def test_bad_settings_raise_config_error_naming_them(make, name, value):
    with pytest.raises(ConfigError) as err:
        make()
    assert name in str(err.value) and value in str(err.value), str(err.value)


def test_good_settings_are_accepted_and_normalised():
    assert VHR(alpha=2).alpha == 2.0 and VHR(layers=(1, -1)).layer_spec == [1, -1]
    assert VHR(layers=torch.tensor([0, 2])).layer_spec == [0, 2]
    assert VAR(sink_dims={9, 3}).sink_dims == [3, 9]
    assert VAR().p == 0.4 and VAR(mode="paper").p == 0.6, "each mode's default p (paper convention: moved)"
    assert VAR(p=0).p == 0.0 and VAR().tau is None
    assert ZeroTuning(gammas=[[0, 1, 2.0]]).gammas == {(0, 1): 2.0}


@pytest.mark.parametrize("cls,kwargs", [(VHR, dict(alpha=1.5, layers=[1, -1], remove_outliers=False)),
                                        (VAR, dict(p=0.3, rho=0.6, tau=5.0, sink_dims=[3], layers=[2], mode="paper")),
                                        (ZeroTuning, dict(gamma=1.5, heads=[(0, 1), (2, 3)])),
                                        (ZeroTuning, dict(gammas={(0, 1): 0.5, (3, 2): 2.0}))])
def test_settings_round_trip(cls, kwargs):
    obj = cls(**kwargs)
    again = cls.from_settings(obj.settings())
    assert again.settings() == obj.settings() and repr(again) == repr(obj)
    with pytest.raises(ConfigError, match="unknown"):
        cls.from_settings({**obj.settings(), "beta": 1})
    with pytest.raises(ConfigError, match="mapping"):
        cls.from_settings([1, 2])


def test_var_defaults_work_on_a_256_wide_llm(tokenizer):
    """The shipped ``tiny`` is a 256-wide Llama: the paper's tau = 20 >= sqrt(256) can never be reached; VAR()'s
    tau resolves to min(20, 0.5 * sqrt(256)) = 8 at attach, while an explicit unreachable tau still raises."""
    torch.manual_seed(0)
    m = TaskMLLM(tiny_config(tokenizer, hidden=256, layers=4), tokenizer).eval()
    batch = m.processor(["Is there a red circle?"], [None])
    var = VAR()
    with torch.no_grad(), var.attach(m, batch):
        m(batch)
    assert var.resolved["tau"] == default_tau(256) == 8.0 == 0.5 * math.sqrt(256)
    with pytest.raises(ConfigError, match=r"tau=20.0 .*sqrt"):
        VAR(tau=20.0).attach(m, batch)
    with pytest.raises(ConfigError, match=r"sink_dims \[300\]"):
        VAR(sink_dims=[300]).attach(m, batch)
    with pytest.raises(ConfigError, match=r"\[7\] are out of range for a model with 4 layers"):
        VHR(layers=[7]).attach(m, batch)
    assert default_tau(4096) == 20.0, "LLaMA-2-7B keeps the paper's 20"
