"""Commands: every `python -m lm.X` the README shows is a top-level command of lm, and the
paths commands had before the restructuring (issue 20) still run them."""

import pathlib
import re
import subprocess
import sys

import pytest
from helpers import REPO, run_cli


def _readme_commands() -> set[str]:
    text = (pathlib.Path(REPO) / "README.md").read_text(encoding="utf-8")
    return set(re.findall(r"\.venv/bin/python -m (lm(?:\.\w+)+)", text))  # the commands to type


def test_every_command_the_readme_shows_is_a_top_level_module_with_a_main():
    commands = _readme_commands()
    assert {"lm.main", "lm.sample", "lm.serve", "lm.evaluate", "lm.prepare", "lm.fit_scaling"} <= commands
    for command in sorted(commands):
        assert command.count(".") == 1, f"{command}: a command is a top-level lm/X.py"
        source = (pathlib.Path(REPO) / "lm" / f"{command.split('.')[1]}.py").read_text(encoding="utf-8")
        assert 'if __name__ == "__main__":' in source, command


@pytest.mark.parametrize("old_path, args, expected", [
    ("lm.data.prepare", (), "--config is required"),
    ("lm.data.tokenizer", (), "give one command, train or report"),
    ("lm.scaling", ("fit", "--results=/no/such/results.csv"), "/no/such/results.csv does not exist"),
])
def test_an_old_command_path_runs_the_moved_command(old_path, args, expected):
    result = run_cli(old_path, *args, check=False)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr


def test_the_old_presets_path_prints_the_table():
    assert "gpt2-small" in run_cli("lm.model.presets").stdout


@pytest.mark.parametrize("command, args", [
    ("lm.prepare", ("--config=configs/shakespeare_bpe.py", "--config.data.unti=line")),
    ("lm.finetune", ("--config=configs/finetune/shakespeare_word_order.py", "--workdir=/tmp/unused",
                     "--config.finetune.stepz=3")),
    ("lm.tokenizer", ("train", "--config=configs/shakespeare_bpe.py", "--config.data.unti=line", "--output=/x")),
])
def test_a_mistyped_override_is_one_line_naming_the_flag_on_every_command_taking_a_config(command, args):
    result = run_cli(command, *args, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    override = [a for a in args if a.startswith("--config.")][0].split("=")[0]
    assert result.stderr.startswith(f"lm: error: {override}: the config has no field"), result.stderr


def test_config_load_errors_name_the_file_or_the_field_and_the_close_match():
    from lm.config.flags import load_error

    missing = OSError("Failed loading config file config_config\n [Errno 2] No such file or directory: 'x/y.py'")
    assert load_error(missing, []).startswith("--config=x/y.py: no such file. Fix:")
    typo = AttributeError(KeyError('\'stepz\'\nDid you mean "steps" instead of "stepz"?'))
    message = load_error(typo, ["prog", "--config=c.py", "--config.train.stepz=3"])
    assert message == ("--config.train.stepz: the config has no field 'stepz'. Fix: did you mean 'steps'? "
                       "The fields are listed in lm/config/schema.py.")


def test_a_run_starts_and_logs_without_importing_torch_or_pandas_though_both_are_installed(tmp_path):
    # tensorboardX imports torch and pyarrow.dataset imports pandas where they are installed:
    # 2 s of every command's start-up that a run on text files never uses.
    probe = ("import sys, lm.main, lm.training.logs as logs; "
             f"logs.MetricWriter({str(tmp_path)!r}).close(); "
             "print(sorted({'torch', 'pandas'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr
