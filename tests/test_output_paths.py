"""lm.files.paths: the output-path checks every command that writes runs before its work,
and the JSON reader that names the file it could not read."""

import os

import pytest

from lm.files import paths


def test_an_output_file_needs_an_existing_directory_and_must_not_be_a_directory(tmp_path):
    (tmp_path / "afile").write_text("keep me")
    paths.check_output_file(str(tmp_path / "new.json"), "--output")  # a new file in a directory
    paths.check_output_file(str(tmp_path / "afile"), "--output")  # an existing file is replaced whole
    for path, problem in ((tmp_path, "is a directory; --output names the file to write"),
                          (tmp_path / "missing" / "r.json", "its directory"),
                          (tmp_path / "afile" / "r.json", "is not a directory")):
        with pytest.raises(paths.PathError, match=problem):
            paths.check_output_file(str(path), "--output")
    os.symlink(tmp_path / "nowhere", tmp_path / "broken")
    with pytest.raises(paths.PathError, match="exists and is not a regular file"):
        paths.check_output_file(str(tmp_path / "broken"), "--output")
    assert (tmp_path / "afile").read_text() == "keep me"


def test_an_output_directory_may_be_missing_but_no_part_of_it_a_file(tmp_path):
    (tmp_path / "afile").write_text("keep me")
    paths.check_output_dir(str(tmp_path), "--plots")
    paths.check_output_dir(str(tmp_path / "a" / "b"), "--plots")  # made on demand
    with pytest.raises(paths.PathError, match=r"--plots=\S*afile: \S*afile is a file, not a directory"):
        paths.check_output_dir(str(tmp_path / "afile"), "--plots")
    with pytest.raises(paths.PathError, match=r"q: \S*q lies under \S*afile, which is a file"):
        paths.check_output_dir(str(tmp_path / "afile" / "p" / "q"), "--plots")
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_a_json_file_that_is_missing_or_malformed_is_named_with_its_line_and_the_fix(tmp_path):
    (tmp_path / "ok.json").write_text('\ufeff{"a": 1}', encoding="utf-8")
    assert paths.read_json(str(tmp_path / "ok.json"), "fix it.") == {"a": 1}
    (tmp_path / "bad.json").write_text('{"a": 1,\n')
    with pytest.raises(paths.PathError, match=r"bad.json is not JSON \(Expecting property name .*: line 2 "
                                              r"column 1\)\. Fix: fix it\."):
        paths.read_json(str(tmp_path / "bad.json"), "fix it.")
    with pytest.raises(paths.PathError, match=r"cannot read \S*nope.json \(No such file or directory\)"):
        paths.read_json(str(tmp_path / "nope.json"), "fix it.")
