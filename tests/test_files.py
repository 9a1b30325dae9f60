"""Write-then-rename: what a reader finds at a path is a whole old file or a whole new one."""

import os

import pytest

from lm.files import atomic


def test_a_file_is_replaced_only_when_the_write_finishes(tmp_path):
    path = str(tmp_path / "results.json")
    atomic.write_json(path, {"loss": 1.0})
    with pytest.raises(RuntimeError), atomic.replacing(path) as f:
        f.write('{"loss": 0.')
        raise RuntimeError("preempted mid-write")
    assert open(path).read() == '{"loss": 1.0}'
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary left beside it


def test_bytes_and_text_round_trip(tmp_path):
    atomic.write_bytes(str(tmp_path / "a.model"), b"\x00\xff")
    atomic.write_text(str(tmp_path / "a.txt"), "héllo\n")
    assert (tmp_path / "a.model").read_bytes() == b"\x00\xff"
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"


def test_a_directory_appears_whole_and_an_old_one_stays_until_the_new_one_is_whole(tmp_path):
    path = str(tmp_path / "best")

    def fill(version):
        def write(staging):
            for name in ("params", "info.json"):
                (open(os.path.join(staging, name), "w")).write(version)
        return write

    atomic.write_directory(path, fill("1"))

    def crash(staging):
        fill("2")(staging)
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic.write_directory(path, crash)
    assert sorted(os.listdir(tmp_path)) == ["best"]
    assert open(os.path.join(path, "params")).read() == "1"
    atomic.write_directory(path, fill("2"))
    assert sorted(os.listdir(tmp_path)) == ["best"]
    assert {open(os.path.join(path, n)).read() for n in os.listdir(path)} == {"2"}
