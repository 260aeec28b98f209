"""ramfs.publish: new files appear whole under their name, or not at all; nothing is replaced."""

from __future__ import annotations

import os

import pytest

from ramfs import publish, tempfiles


def test_new_file_is_private_and_appears_only_when_published(tmp_path):
    out = tmp_path / "out.img"
    old = os.umask(0)
    try:
        with publish.NewFile(out) as new:
            assert new.tmp_path in tempfiles._active
            assert os.stat(new.tmp_path).st_mode & 0o777 == 0o600
            os.write(new.fd, b"data")
            assert not out.exists()
            new.publish()
            assert out.read_bytes() == b"data"
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["out.img"]  # the temporary's name is gone
    assert new.tmp_path not in tempfiles._active


def test_nothing_is_left_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with publish.NewFile(tmp_path / "out.img") as new:
            os.write(new.fd, b"half")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_an_existing_name_is_never_replaced(tmp_path):
    out = tmp_path / "out.img"
    out.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        publish.NewFile(out).create()
    out.unlink()
    with publish.NewFile(out) as new:
        os.write(new.fd, b"ours")
        out.write_bytes(b"theirs")  # appears meanwhile
        with pytest.raises(FileExistsError):
            new.publish()
    assert out.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["out.img"]


def test_the_inode_written_is_published_not_the_temporary_name(tmp_path):
    out = tmp_path / "out.img"
    with publish.NewFile(out) as new:
        os.write(new.fd, b"ours")
        os.rename(new.tmp_path, tmp_path / "moved")  # someone swaps the temporary's name
        (tmp_path / new.tmp_name).write_bytes(b"swapped in")
        new.publish()
    assert out.read_bytes() == b"ours"
    assert os.path.samefile(out, tmp_path / "moved")


def test_a_temporary_name_taken_by_someone_else_is_left_alone(tmp_path):
    new = publish.NewFile(tmp_path / "out.img")
    (tmp_path / new.tmp_name).write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        new.create()
    assert (tmp_path / new.tmp_name).read_bytes() == b"not ours"
