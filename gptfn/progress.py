"""Progress bars for long work (tqdm), or nothing when they are turned off."""

from __future__ import annotations

from typing import Optional


class NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def byte_bar(total: Optional[int], enabled: bool, desc: str, initial: int = 0):
    """A tqdm bar counting bytes (or a stand-in that does nothing when not ``enabled``)."""
    if not enabled:
        return NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=desc,
                mininterval=0.5)
