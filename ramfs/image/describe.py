"""Facts about an image as plain data: ``ramfs info --json`` and the mount's ``image.json``.

The shape is documented in docs/info-json.md and is a contract for tool authors: fields are
only ever added.
"""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING, Any

from ramfs import __version__
from ramfs.errors import FormatError, RamfsError
from ramfs.format.qcow2 import Snapshot, is_qcow2
from ramfs.image.files import FileSource
from ramfs.image.model import Device, Image, domain_identity, open_image
from ramfs.image.qcow2 import disk_snapshots, snapshots_with_state

if TYPE_CHECKING:
    from ramfs.image.cache import CachePolicy
    from ramfs.image.phys import Placement

INFO_SCHEMA_VERSION = 2


def describe(image: Image, below_4g: int | None = None, placement: Placement | None = None) -> dict[str, Any]:
    layout = image.layout
    lv = image.libvirt
    warnings = list(image.warnings)
    devices, problems = _devices(image)
    warnings.extend(problems)
    libvirt = None
    if lv is not None:
        h = lv.header
        libvirt = {
            "magic": h.magic.decode("ascii"),
            "complete": h.complete,
            "version": h.version,
            "data_len": h.data_len,
            "was_running": h.was_running,
            "format": h.format.label,
            "format_code": int(h.format),
            "cookie_offset": h.cookie_offset,
            "byteorder": h.byteorder,
            "stream_offset": h.stream_offset,
            "domain": domain_identity(lv.domain_xml),
        }
    conf = layout.configuration
    snap = getattr(image.source, "snapshot", None)
    return {
        "schema_version": INFO_SCHEMA_VERSION,
        "ramfs_version": __version__,
        "path": image.path,
        "size": image.source.size,
        "container": image.container,
        "qcow2_snapshot": _snapshot_facts(snap) if isinstance(snap, Snapshot) else None,
        "libvirt": libvirt,
        "format": image.format.label if image.format is not None else "qemu",
        "encoding": image.encoding,
        "was_running": image.was_running,
        "machine": layout.machine,
        "capabilities": list(layout.capabilities),
        "page_size": layout.page_size,
        "target_page_bits": conf.target_page_bits if conf else None,
        "uuid": conf.uuid.hex() if conf and conf.uuid else None,
        "ram_total": layout.mem_size_total,
        "stream": {
            "offset": layout.base,
            "ram_section_id": layout.ram_section_id,
            "footers": layout.footers,
            "ram_parts": layout.ram_parts,
            "switchover_start": layout.switchover_start,
            "commands": [{"offset": c.offset, "name": c.name} for c in layout.commands],
            "ram_end_offset": layout.ram_end_offset,
            "device_offset": layout.device_offset,
            "eof_offset": layout.eof_offset,
            "vmdesc_offset": layout.vmdesc_offset,
            "vmdesc_size": len(layout.vmdesc) if layout.vmdesc is not None else None,
            "end_offset": layout.end,
            "padding": layout.padding,
            "iterables": [{"idstr": it.idstr, "section_id": it.section_id, "instance_id": it.instance_id,
                           "version": it.version, "pieces": len(it.pieces), "bytes": it.size}
                          for it in layout.iterables],
            # Offsets above count in the decompressed stream for formats 1-5, else in the file.
            "decompressed": bool(image.format is not None and image.format.compressed),
        },
        "blocks": [
            {
                "idstr": b.idstr,
                "used_length": b.used_length,
                "page_size": b.page_size,
                "pages": b.num_pages,
                "populated_pages": b.populated_pages,
                "populated_bytes": b.populated_pages * b.page_size,
                "mapped_ram": None if b.record.mapped is None else {
                    "header_offset": b.record.mapped.offset,
                    "header_version": b.record.mapped.version,
                    "bitmap_offset": b.record.mapped.bitmap_offset,
                    "pages_offset": b.record.mapped.pages_offset,
                },
            }
            for b in image.blocks
        ],
        "devices": None if devices is None else [
            {"name": d.name, "instance_id": d.instance_id, "version": d.version} for d in devices],
        "phys": _phys(image, placement if placement is not None else _placement(below_4g), warnings),
        "warnings": warnings,
    }


def _snapshot_facts(s: Snapshot) -> dict[str, Any]:
    return {
        "index": s.index,
        "id": s.id,
        "name": s.name,
        "date": datetime.datetime.fromtimestamp(s.date_sec, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "date_sec": s.date_sec,
        "date_nsec": s.date_nsec,
        "vm_clock_nsec": s.vm_clock_nsec,
        "vm_state_size": s.vm_state_size,
        "disk_size": s.disk_size,
    }


def is_qcow2_disk(path: str) -> bool:
    """A qcow2 file (its snapshots are the images; ``describe_qcow2`` lists them)."""
    with FileSource(path) as f:
        return is_qcow2(f.read_at(0, 4))


def describe_qcow2(path: str, placement: Placement | None = None,
                   cache: CachePolicy | None = None) -> dict[str, Any]:
    """A qcow2 disk: its header and every internal snapshot, each snapshot with VM state
    described as a save image (``image``), or why it cannot be (``error``)."""
    h, snaps, size = disk_snapshots(path)
    out = []
    for s in snaps:
        facts: dict[str, Any] = {**_snapshot_facts(s), "image": None, "error": None}
        if s.vm_state_size:
            try:
                with open_image(path, snapshot=s.index, reads=False, cache=cache) as img:
                    facts["image"] = describe(img, placement=placement)
            except RamfsError as e:
                facts["error"] = str(e)
        out.append(facts)
    return {
        "schema_version": INFO_SCHEMA_VERSION,
        "ramfs_version": __version__,
        "path": path,
        "size": size,
        "container": "qcow2",
        "qcow2": {
            "version": h.version,
            "cluster_size": h.cluster_size,
            "extended_l2": h.extended_l2,
            "virtual_size": h.size,
        },
        "snapshots": out,
    }


def check_qcow2(path: str, warnings: list[str] | None = None, placement: Placement | None = None) -> list[str]:
    """``check`` of every snapshot with VM state of a qcow2 disk (problems prefixed with the
    snapshot's name); the disk's header and snapshot table first."""
    try:
        with_state = snapshots_with_state(path)
    except RamfsError as e:
        return [str(e)]
    problems: list[str] = []
    if not with_state:
        return ["no snapshot with VM state (only disk snapshots, or none): nothing to check"]
    for s in with_state:
        own: list[str] = []
        found = check(path, warnings=own, placement=placement, snapshot=s.index)
        said = f"snapshot {s.name!r}"
        problems += [p if said in p else f"{said}: {p}" for p in found]
        if warnings is not None:
            warnings += [w if said in w else f"{said}: {w}" for w in own]
    return problems


def _placement(below_4g: int | None) -> Placement:
    from ramfs.image.phys import Placement
    return Placement(below_4g)


def _phys(image: Image, placement: Placement, warnings: list[str]) -> dict[str, Any] | None:
    try:
        pmap = placement.map(image)
    except RamfsError as e:
        warnings.append(str(e))
        return None
    warnings.extend(pmap.warnings)  # a guest-physical layout ramfs cannot know: said, not guessed
    return pmap.as_json()


def _devices(image: Image) -> tuple[list[Device] | None, list[str]]:
    """The vmdesc device list, and what is wrong with the vmdesc (bad JSON, page size)."""
    try:
        desc = image.layout.vmdesc_json()
        devices = image.devices()
    except FormatError as e:
        return None, [str(e)]
    problems = []
    if desc is not None and "page_size" in desc and desc["page_size"] != image.page_size:
        problems.append(f"VM description says page_size {desc['page_size']}, the stream implies "
                        f"{image.page_size}")
    return devices, problems


def check(path: str, *, cache: str | os.PathLike[str] | None = None, use_cache: bool = False,
          warnings: list[str] | None = None, placement: Placement | None = None,
          snapshot: str | int | None = None) -> list[str]:
    """Validate an image's structure; return every problem found (empty: the image is sound).

    A structural error stops the walk (what follows cannot be located), so it is the last
    problem listed; findings QEMU would tolerate (1 MiB misalignment, stray bitmap bits,
    a missing VM description, an unfinished libvirt save) are listed and the walk goes on.
    ``warnings`` receives what is sound but cannot be known from the image (a NUMA guest's
    node order without its domain XML): nothing wrong with the image, said all the same.
    """
    problems: list[str] = []
    try:
        with open_image(path, cache=cache, use_cache=use_cache, reads=False, allow_partial=True,
                        snapshot=snapshot) as img:
            problems.extend(img.warnings)
            if img.layout.vmdesc is None and img.layout.eof_offset is not None:
                problems.append("no VM description (vmdesc) after QEMU_VM_EOF")
            problems.extend(_devices(img)[1])
            if warnings is not None:
                try:
                    warnings.extend((placement if placement is not None else _placement(None)).map(img).warnings)
                except RamfsError as e:
                    problems.append(str(e))
    except RamfsError as e:
        problems.append(str(e))
    return problems
