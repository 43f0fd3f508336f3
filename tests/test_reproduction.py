"""bench/reproduction.py: sizes and the regenerate command, resumable steps, balanced data subsets."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from reproduction import Experiment, command, parser, sizes_of  # noqa: E402

DEFAULTS = {"full": {"queries": 500, "steps": 32, "arch": "small-cnn", "lambda1": [0.0, 0.01], "train": None},
            "quick": {"queries": 40, "steps": 4, "arch": "small-cnn", "lambda1": [0.0], "train": None}}


def _options():
    p = parser("test")
    p.add_argument("--queries", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--arch")
    p.add_argument("--lambda1", type=float, nargs="+")
    p.add_argument("--train", type=int)
    return p


def test_sizes_are_the_modes_defaults_overridden_by_the_flags_given():
    p = _options()
    assert sizes_of(p.parse_args(["--quick"]), DEFAULTS, p) == DEFAULTS["quick"]
    args = p.parse_args(["--steps", "7", "--lambda1", "0.5", "1"])
    assert sizes_of(args, DEFAULTS, p) == {**DEFAULTS["full"], "steps": 7, "lambda1": [0.5, 1.0]}


@pytest.mark.parametrize("flag", [["--queries", "0"], ["--steps", "-3"], ["--train", "0"]])
def test_a_size_below_one_is_a_usage_error(flag, capsys):
    p = _options()
    with pytest.raises(SystemExit) as exit_info:
        sizes_of(p.parse_args(flag), DEFAULTS, p)
    assert exit_info.value.code == 2
    assert f"{flag[0]}: expected whole numbers >= 1" in capsys.readouterr().err


def test_the_command_writes_every_size_and_reads_back_to_the_same_sizes():
    p = _options()
    args = p.parse_args(["--quick", "--steps", "9", "--lambda1", "0.25", "0.5", "--seed", "3", "--device", "cpu"])
    sizes = sizes_of(args, DEFAULTS, p)
    text = command("reproduce_x.py", sizes, args)
    assert text == ("python bench/reproduce_x.py --quick --queries 40 --steps 9 --arch small-cnn "
                    "--lambda1 0.25 0.5 --seed 3 --device cpu")
    again = p.parse_args(text.split()[2:])
    assert sizes_of(again, DEFAULTS, p) == sizes and (again.seed, again.device) == (3, "cpu")


def test_a_step_is_computed_once_per_settings_and_redone_with_fresh(tmp_path):
    p = _options()
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            return {"value": value}
        return run

    exp = Experiment("t", p.parse_args(["--quick", "--work", str(tmp_path)]))
    assert exp.step("s", {"a": 1}, compute(1)) == {"value": 1}
    assert exp.step("s", {"a": 1}, compute(2)) == {"value": 1}  # finished before: loaded
    assert exp.step("s", {"a": 2}, compute(3)) == {"value": 3}  # other settings: redone
    fresh = Experiment("t", p.parse_args(["--quick", "--work", str(tmp_path), "--fresh"]))
    assert fresh.step("s", {"a": 2}, compute(4)) == {"value": 4}
    assert calls == [1, 3, 4]
    assert exp.array("x", {"n": 3}, lambda: np.arange(3)).tolist() == [0, 1, 2]
    assert exp.array("x", {"n": 3}, lambda: np.zeros(3)).tolist() == [0, 1, 2]


def test_a_data_limit_is_class_balanced_and_seeded(tmp_path):
    p = _options()
    exp = Experiment("t", p.parse_args(["--quick", "--work", str(tmp_path)]))
    images, labels = exp.data("train", 95)
    assert images.shape == (95, 1, 28, 28) and images.dtype == np.uint8
    counts = np.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    again = exp.data("train", 95)
    np.testing.assert_array_equal(again[1], labels)
    other = Experiment("t", p.parse_args(["--quick", "--work", str(tmp_path), "--seed", "1"])).data("train", 95)
    assert not np.array_equal(other[0], images)


def test_a_script_refuses_a_bad_size_before_any_work(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH / "reproduce_colotride.py"), "--quick", "--queries", "0",
                          "--work", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "--queries: expected whole numbers >= 1" in run.stderr
    assert not any(tmp_path.iterdir())
