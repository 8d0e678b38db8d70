"""parse_bytes: the memory sizes --dtr accepts (powers of 1024, as megengine.dtr reads them), and
a one-line UserError for anything else."""
import pytest

from engine.errors import UserError
from engine.steps import dtr_threshold, parse_bytes


@pytest.mark.parametrize("text, want", [
    ("5GB", 5 << 30),
    ("512MB", 512 << 20),
    ("1.5 GiB", 3 << 29),
    ("1.5GIB", 3 << 29),
    ("64kb", 64 << 10),
    ("2 KiB", 2 << 10),
    ("1TB", 1 << 40),
    ("100B", 100),
    ("1000000", 1000000),
    (" 3 gb ", 3 << 30),
    ("0.5MB", 1 << 19),
    ("1e3", 1000),
    (4096, 4096),
])
def test_parse_bytes_reads_sizes_in_powers_of_1024(text, want):
    assert parse_bytes(text) == want
    assert isinstance(parse_bytes(text), int)


@pytest.mark.parametrize("text, match", [
    ("lots", "cannot read 'lots' as a memory size; use e.g. 5GB or 512MB"),
    ("5 GBs", "cannot read '5 GBs' as a memory size"),
    ("GB", "cannot read 'GB' as a memory size"),
    ("", "cannot read '' as a memory size"),
    ("0", "memory size must be positive, got '0'"),
    ("-1GB", "memory size must be positive, got '-1GB'"),
])
def test_parse_bytes_refuses_anything_else_with_a_user_error(text, match):
    with pytest.raises(UserError, match=match):
        parse_bytes(text)


def test_a_dtr_threshold_given_as_a_size_is_that_size():
    assert dtr_threshold("6GB") == 6 << 30
    with pytest.raises(UserError):
        dtr_threshold("auto-ish")
