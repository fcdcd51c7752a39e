"""`relaxedconv demo`: bad options end with exit 2 and one line; small images and group orders
without every quarter turn print what they can check instead of a traceback."""
from __future__ import annotations

import pytest

from relaxedconv.cli import main


@pytest.mark.parametrize("argv, says", [
    (["--batch", "0"], "--batch must be >= 1"),
    (["--size", "0"], "--size must be >= 1"),
    (["--group-order", "0"], "--group-order must be >= 1"),
    (["--omega-rot", "nan"], "--omega-rot must be a finite number >= 0"),
    (["--omega-rot", "-1"], "--omega-rot must be a finite number >= 0"),
    (["--backend", "nope"], "invalid choice: 'nope'"),
])
def test_bad_options_exit_2_with_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_a_map_too_small_for_the_shift_check_says_so(capsys):
    assert main(["demo", "--size", "4", "--batch", "2"]) == 0  # was a TypeError formatting None
    out = capsys.readouterr().out
    assert "translation=n/a (map too small)" in out and "rotation_90=" in out


@pytest.mark.parametrize("order, present, absent", [
    (2, ["rotation_180="], ["rotation_90=", "rotation_270="]),
    (3, ["no quarter turn is in C_N"], ["rotation_90=", "rotation_180="]),
])
def test_whole_model_is_checked_only_on_rotations_of_its_group(order, present, absent, capsys):
    # a C_3 model is not meant to be invariant to a quarter turn; its error there is no measure of anything
    assert main(["demo", "--group-order", str(order), "--size", "8", "--batch", "2"]) == 0
    whole = capsys.readouterr().out.split("whole model")[1]
    assert all(s in whole for s in present) and not any(s in whole for s in absent)
