"""One set of number validators for every command: a bad number is refused while the arguments are
parsed, before anything starts, in the same words whichever command takes it. No Ray."""

from __future__ import annotations

import pytest

from ray_jobs import cli

INFER = ["infer", "videos/", "--model", "preset:tiny", "--output", "out/"]
EVAL = ["eval", "videos/", "--model", "preset:tiny", "--report", "report/"]
DECODE = ["decode", "clip.mp4"]
TRAIN = ["train", "--train", "a/", "--val", "b/", "--output", "run/"]
REPORT = ["report", "labels/", "--out", "report/"]


def _parse(argv: list[str]):
    return cli.build_parser(argv).parse_args(argv)


@pytest.mark.parametrize("argv, flag, value, says", [
    (INFER, "--actors", "0", "0 is not a positive integer"),
    (EVAL, "--batch-size", "-2", "-2 is not a positive integer"),
    (INFER, "--max-windows", "0", "0 is not a positive integer"),
    (DECODE, "--max-windows", "0", "0 is not a positive integer"),
    (INFER, "--stride", "0", "0 is not a positive number"),
    (DECODE, "--stride", "0", "0 is not a positive number"),
    (DECODE, "--seconds", "0", "0 is not a positive number"),
    (DECODE, "--start", "-1", "-1 is not zero or a positive number"),
    (INFER, "--gpus-per-actor", "-0.5", "-0.5 is not zero or a positive number"),
    (TRAIN, "--stall-timeout", "0", "0 is not a positive number"),
    (INFER, "--decode-cpus", "two", "invalid int value: 'two'"),
    (REPORT, "--top", "101", "101 is not a whole number from 0 to 100"),
    (REPORT, "--examples", "-1", "-1 is not a whole number from 0 to 100"),
])
def test_a_bad_number_is_refused_while_parsing_with_the_option_named(argv, flag, value, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse([*argv, f"{flag}={value}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: argument {flag}: {says}")


def test_the_edges_of_each_range_are_accepted():
    args = _parse([*DECODE, "--start", "0", "--stride", "0.5", "--max-windows", "1"])
    assert (args.start, args.stride, args.max_windows) == (0.0, 0.5, 1)
    args = _parse([*INFER, "--gpus-per-actor", "0", "--actors", "1"])
    assert (args.gpus_per_actor, args.actors) == (0.0, 1)
    args = _parse([*REPORT, "--top", "0", "--timelines", "100"])
    assert (args.top, args.timelines) == (0, 100)
