"""plugins/trt_aot.py without TensorRT: a plugin's implementations are bound once each."""

import pytest

from mame_deploy.errors import UserError
from mame_deploy.plugins.trt_aot import Registration, constant_dim


def test_registration_binds_aot_once_and_jit_once_on_demand():
    calls = []
    registration = Registration(lambda: calls.append("aot"), lambda: calls.append("jit"))
    registration.register()
    registration.register()
    assert calls == ["aot"]
    registration.register(jit=True)
    registration.register(jit=True)
    registration.register()
    assert calls == ["aot", "jit"]


def test_constant_dim_names_the_operator():
    assert constant_dim(7, "TokenMerge", "length") == 7

    class Symbolic:
        is_constant = False

    with pytest.raises(UserError, match="TokenMerge needs a static length"):
        constant_dim(Symbolic(), "TokenMerge", "length")
