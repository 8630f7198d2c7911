"""kernels/host.py: the launchers' plain-Python integer helpers agree with Triton's own."""
import pytest
import triton

from vit_fast.kernels.host import cdiv, next_power_of_2


@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65, 80, 100, 197, 768, 1280, 16384, 50432, 2**31 + 1])
def test_next_power_of_2_matches_triton(n):
    assert next_power_of_2(n) == triton.next_power_of_2(n)


@pytest.mark.parametrize("a", [0, 1, 127, 128, 129, 197, 50432, 98304 * 4])
@pytest.mark.parametrize("b", [1, 2, 16, 64, 128])
def test_cdiv_matches_triton(a, b):
    assert cdiv(a, b) == triton.cdiv(a, b)
