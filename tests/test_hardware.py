import pytest

from tuneloop.server.hardware import fastest_dtype


@pytest.mark.parametrize(
    ("pref", "device", "native", "want"),
    [
        ("auto", "cpu", True, "bfloat16"),
        ("auto", "cpu", False, "float32"),
        ("auto", "cuda", True, "bfloat16"),
        ("auto", "cuda", False, "float16"),
        ("float32", "cpu", True, "float32"),
        ("bfloat16", "cpu", False, "bfloat16"),
    ],
)
def test_auto_follows_the_bf16_probe(pref: str, device: str, native: bool, want: str) -> None:
    assert fastest_dtype(pref, device, bf16_probe=lambda _d: native) == want


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="dtype"):
        fastest_dtype("int3")
