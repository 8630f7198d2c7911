"""Integer helpers for the launchers' host code (grids, block sizes).

Plain Python on purpose: since Triton 3.9 `triton.cdiv` and `triton.next_power_of_2` are
constexpr functions whose host-side call costs about 2 us each (argument unwrapping), and a
LayerNorm forward + backward makes eight such calls on its launch path.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()
