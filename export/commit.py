"""Committing an export: its artifact(s) and their report, as one unit.

An export writes files that belong together: the artifact and
``OUT.report.json``, which names each artifact with its size and sha256. The report is the
commit record, renamed into place last:

1. every file is written whole under a temporary name beside its final one,
   ``.NAME.XXXXXXXX.tmp`` (+ the artifact's own suffix), and fsynced;
2. the previous artifacts get a second, temporary name (a hard link), and the previous
   report is moved to a temporary name, durably, before any artifact is renamed: an old
   report never stands beside a new artifact;
3. the artifacts are renamed into place, then the report; then the directory is fsynced.

An exception at any step (a full disk at any write or rename) leaves the previous artifacts
and report as they were (step 3 is rolled back from the links) or the new ones complete.
A kill -9 or a power cut leaves the same, except inside the commit itself (between the
first rename of step 2 and the last of step 3, a few system calls), where it leaves whole
artifacts with no report: export again. Never a report that describes files other than
those beside it (``read_report`` checks), never a half-written file under a final name.
The temporary files a killed export leaves are removed by the next export of the same name
(``remove_stale_temps``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from gptfn import fileio
from gptfn.fileio import fsync_dir, fsync_file, sha256_file

REPORT_SUFFIX = ".report.json"


class StaleReport(ValueError):
    """A report that does not describe the files beside it."""


def report_path(out: Path) -> Path:
    """Where the report of artifact ``out`` goes: ``OUT.report.json``, beside it."""
    return out.with_name(out.name + REPORT_SUFFIX)


def temp_path(final: Path, suffix: str = "") -> Path:
    """A new empty file beside ``final``, ``.NAME.XXXXXXXX.tmp<suffix>``, with the mode the
    umask gives."""
    return fileio.temp_path(final, ".tmp" + suffix)


def remove_stale_temps(finals: Iterable[Path]) -> List[Path]:
    """Delete the temporary files that killed exports of ``finals`` left beside them."""
    return [p for final in finals for p in fileio.remove_stale_temps(final)]


def _link_backup(final: Path) -> Optional[Path]:
    """A second, temporary name for the file at ``final``, so that a failed commit can put
    it back; None where the file system has no hard links."""
    backup = temp_path(final)
    try:
        backup.unlink()
        os.link(final, backup)
    except OSError:
        backup.unlink(missing_ok=True)
        return None
    return backup


def commit(pairs: Sequence[Tuple[Path, Path]], report: dict, report_final: Path) -> dict:
    """Rename the verified artifacts ``pairs`` (temporary path, final path) into place with
    ``report`` (to which their names, sizes and sha256 are added) as one unit; see the
    module docstring for the order. An exception before the report is renamed puts the
    previous files back, their report included. Returns the report as written."""
    for tmp, _ in pairs:
        fsync_file(tmp)
    report = dict(report)
    report["artifacts"] = [{"file": final.name, "size_bytes": tmp.stat().st_size,
                            "sha256": sha256_file(tmp)} for tmp, final in pairs]
    directory = report_final.parent
    scratch: List[Path] = []  # temporary names: removed however this ends
    previous = {}  # final -> its backup (None: none could be made), for the files there now
    renamed: List[Path] = []
    old_report: Optional[Path] = None
    try:
        report_tmp = temp_path(report_final)
        scratch.append(report_tmp)
        report_tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        fsync_file(report_tmp)
        for _, final in pairs:
            if os.path.lexists(final):
                previous[final] = _link_backup(final)
                scratch += [previous[final]] if previous[final] else []
        if report_final.is_file():
            moved = temp_path(report_final)
            scratch.append(moved)
            os.replace(report_final, moved)  # no old report beside a new artifact
            old_report = moved
            fsync_dir(directory)
        for tmp, final in pairs:
            os.replace(tmp, final)
            renamed.append(final)
        os.replace(report_tmp, report_final)  # the commit
    except BaseException:
        _roll_back(renamed, previous, old_report, report_final)
        raise
    finally:
        for path in scratch:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # a temporary name: the next export of this name removes it
    fsync_dir(directory)
    return report


def _roll_back(renamed: List[Path], previous: dict, old_report: Optional[Path],
               report_final: Path) -> None:
    """Best effort: the previous artifacts under their names, then their report. Where an
    artifact cannot be put back, no report is (the new artifact stays, unreported)."""
    restored = True
    for final in renamed:
        try:
            if final not in previous:
                final.unlink()  # there was none before
            elif previous[final] is not None:
                os.replace(previous[final], final)
            else:
                restored = False
        except OSError:
            restored = False
    if old_report is not None and restored:
        try:
            os.replace(old_report, report_final)
        except OSError:
            pass


def read_report(path: Path) -> dict:
    """The report at ``path``, after checking that every artifact it names is the file beside
    it (size and sha256). Names are confined to the report's own directory: a report naming
    any other place is refused. Raises StaleReport (a ValueError) or OSError."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StaleReport(f"{path}: not an export report: {e}") from None
    entries = report.get("artifacts") if isinstance(report, dict) else None
    if not isinstance(entries, list) or not entries:
        raise StaleReport(f"{path}: names no artifacts")
    for entry in entries:
        name = entry.get("file") if isinstance(entry, dict) else None
        if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name
                or "\\" in name or "\0" in name):
            raise StaleReport(f"{path}: artifact name {name!r} is not a file name in the "
                              "report's own directory")
        artifact = path.parent / name
        if not artifact.is_file():
            raise StaleReport(f"{path}: names {name}, which is not there")
        if (artifact.stat().st_size != entry.get("size_bytes")
                or sha256_file(artifact) != entry.get("sha256")):
            raise StaleReport(f"{path}: {name} is not the file this report describes "
                              "(size or sha256 differ): export again")
    return report
