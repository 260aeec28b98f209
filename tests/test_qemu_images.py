"""Tests for the QEMU image helper (tests/qemu_images.py).

The helper is the referee for ramfs (it makes ground truths and restores
converted images in real QEMU), so its own guarantees are checked here:
the ground truth holds the blobs, every cached image restores to exactly
the ground truth, errors carry QEMU's text, and the cache is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import qemu_images
from qemu_images import (LARGE_PC, SMALL_PC, SMALL_Q35, Blob, GuestImages, MigrationError,
                         Recipe, blob_bytes, build, first_difference, pattern_page,
                         restore_and_dump)

# random.Random(1).randbytes(1 MiB): the random blob of the shared fixtures.
FIXTURE_RANDOM_BLOB_SHA256 = '08b2a8da54e3e185f025ac53633deae5a583c8880a72a21e169a1da022baa003'
# Where libvirt 11.3 starts the QEMU stream in the firmware fixtures (92 + data_len).
LIBVIRT_STREAM_OFFSET = 67427
CACHE_HIT_MAX_SECONDS = 1.0
TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope='module')
def small_pc() -> GuestImages:
    return build(SMALL_PC)


# ------------------------------------------------------------ no QEMU needed

def test_random_blob_matches_shared_fixture():
    blob = Blob(addr=16 << 20, size=1 << 20, kind='random', seed=1)
    assert hashlib.sha256(blob_bytes(blob)).hexdigest() == FIXTURE_RANDOM_BLOB_SHA256


def test_pattern_blob_names_its_pages():
    blob = Blob(addr=32 << 20, size=3 * 4096 + 100, kind='pattern', seed=7)
    data = blob_bytes(blob)
    assert len(data) == blob.size
    assert data.startswith(b'RAMFS-BLOB-7-PAGE-00000000RAMFS-BLOB-7-PAGE-00000000')
    assert data[2 * 4096:3 * 4096] == pattern_page(7, 2)
    assert data[3 * 4096:] == pattern_page(7, 3)[:100]


@pytest.mark.parametrize('kwargs, message', [
    (dict(machine='isapc'), 'machine'),
    (dict(ram_mib=3584), 'splits RAM'),
    (dict(machine='q35', ram_mib=2816), 'splits RAM'),
    (dict(blobs=(Blob(addr=0xA0000, size=4096, kind='random', seed=1),)), 'must lie in'),
    (dict(blobs=(Blob(addr=60 << 20, size=4096, kind='random', seed=1),)), 'must lie in'),
    (dict(blobs=(Blob(addr=16 << 20, size=8192, kind='random', seed=1),
                 Blob(addr=(16 << 20) + 4096, size=4096, kind='pattern', seed=2))), 'overlap'),
])
def test_recipe_rejects_what_would_not_be_a_ground_truth(kwargs, message):
    fields = dict(machine='pc', ram_mib=64, blobs=(), run_seconds=0.0) | kwargs
    with pytest.raises(ValueError, match=message):
        Recipe(**fields)


def test_predefined_recipes_are_valid_and_distinct():
    recipes = [SMALL_PC, SMALL_Q35, LARGE_PC]
    assert len({qemu_images.cache_key(r) for r in recipes}) == len(recipes)
    assert sum(b.size for b in LARGE_PC.blobs) == 48 << 20


# ---------------------------------------------------------------- real QEMU

@pytest.mark.qemu
def test_build_writes_all_files(small_pc):
    assert small_pc.recipe == SMALL_PC
    assert small_pc.ram_bytes == 64 << 20
    for path in (small_pc.sequential, small_pc.pmemsave, small_pc.mapped_ram,
                 small_pc.mapped_ram_multifd, small_pc.recipe_json):
        assert path.is_file(), path
        assert path.parent == small_pc.directory
    assert (small_pc.directory / 'DONE').is_file()
    assert small_pc.pmemsave.stat().st_size == small_pc.ram_bytes
    for image in (small_pc.sequential, small_pc.mapped_ram, small_pc.mapped_ram_multifd):
        assert image.read_bytes()[:4] == b'QEVM', image
    info = json.loads(small_pc.recipe_json.read_text())
    assert info['recipe']['ram_mib'] == 64
    assert info['machine_type'].startswith('pc-i440fx-')
    assert info['accelerator'] in ('kvm', 'tcg')


@pytest.mark.qemu
def test_pmemsave_holds_every_blob_at_its_address(small_pc):
    with open(small_pc.pmemsave, 'rb') as dump:
        for blob in SMALL_PC.blobs:
            dump.seek(blob.addr)
            assert dump.read(blob.size) == blob_bytes(blob), blob


@pytest.mark.qemu
def test_restored_mapped_ram_equals_pmemsave(small_pc, tmp_path):
    out = restore_and_dump(small_pc.mapped_ram, SMALL_PC, capabilities=('mapped-ram',),
                           out_path=tmp_path / 'restored.bin')
    assert first_difference(out, small_pc.pmemsave) is None


@pytest.mark.qemu
def test_restored_mapped_ram_multifd_equals_pmemsave(small_pc, tmp_path):
    out = restore_and_dump(small_pc.mapped_ram_multifd, SMALL_PC,
                           capabilities=('mapped-ram', 'multifd'), multifd_channels=4,
                           out_path=tmp_path / 'restored.bin')
    assert first_difference(out, small_pc.pmemsave) is None


@pytest.mark.qemu
def test_restore_at_offset_like_a_libvirt_image(small_pc, tmp_path):
    wrapped = tmp_path / 'wrapped.img'
    wrapped.write_bytes(b'\xa5' * LIBVIRT_STREAM_OFFSET + small_pc.sequential.read_bytes())
    out = restore_and_dump(wrapped, SMALL_PC, offset=LIBVIRT_STREAM_OFFSET,
                           out_path=tmp_path / 'restored.bin')
    assert first_difference(out, small_pc.pmemsave) is None


@pytest.mark.qemu
def test_restore_failure_carries_qemu_error_text(tmp_path):
    garbage = tmp_path / 'garbage.img'
    garbage.write_bytes(bytes(4096))
    with pytest.raises(MigrationError, match='Not a migration stream'):
        restore_and_dump(garbage, SMALL_PC, out_path=tmp_path / 'never.bin')
    assert not (tmp_path / 'never.bin').exists()


@pytest.mark.qemu
def test_restore_qemu_does_not_prefill_blobs(tmp_path):
    """A restore proof must see only the image: the restoring QEMU has no
    loader devices, so its RAM is zero where the blobs go until the image
    is loaded."""
    with qemu_images._scratch_dir() as scratch, \
            qemu_images._start(SMALL_PC, scratch, 'empty', incoming=True) as qemu:
        qemu.pmemsave(SMALL_PC.ram_bytes, tmp_path / 'empty.bin')
    with open(tmp_path / 'empty.bin', 'rb') as dump:
        for blob in SMALL_PC.blobs:
            dump.seek(blob.addr)
            assert dump.read(blob.size) == bytes(blob.size), blob


@pytest.mark.qemu
def test_second_build_is_a_cache_hit(small_pc):
    started = time.monotonic()
    again = build(SMALL_PC)
    elapsed = time.monotonic() - started
    assert again == small_pc
    assert elapsed < CACHE_HIT_MAX_SECONDS, 'cache hit took %.2f s' % elapsed


@pytest.mark.qemu
def test_concurrent_builds_share_one_build(tmp_path):
    """Two processes asking for the same new recipe at once: one builds,
    the other waits on the lock and reuses it (without the lock the second
    rename into place would fail)."""
    script = textwrap.dedent('''
        import qemu_images as q
        recipe = q.Recipe(machine='pc', ram_mib=32, run_seconds=0.2,
                          blobs=(q.Blob(addr=2 << 20, size=65536, kind='pattern', seed=3),))
        print(q.build(recipe).directory)
    ''')
    env = dict(os.environ, RAMFS_TEST_CACHE=str(tmp_path / 'cache'),
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS_DIR),
                                                        os.environ.get('PYTHONPATH')])))
    procs = [subprocess.Popen([sys.executable, '-c', script], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    results = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_out, err) in zip(procs, results):
        assert proc.returncode == 0, err
    directories = {out.strip() for out, _ in results}
    assert len(directories) == 1
    entries = sorted(p.name for p in (tmp_path / 'cache').iterdir())
    assert len(entries) == 2 and entries[1] == entries[0] + '.lock', entries
