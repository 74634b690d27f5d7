"""Taking a lock instance apart: claims, moving aside, removal.

Only the holder of an instance's *claim* may remove that instance (a stale
one, or its own at release near lease expiry). A claim is a symbolic link
inside the instance (``claim``, ``claim.2``, ...) whose target names its maker,
made and undone through the instance's directory descriptor, so it guards that
instance and no other, wherever it has moved. Removal is a rename aside to a
unique name (one atomic step that frees the lock path), then deletion.
``docs/lock-model.md`` and ``spec/`` explain why each step is needed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from typing import Final

from ._owner import OWNER_FILE, claim_maker_alive, claim_tag

__all__ = [
    "CLAIM",
    "CLAIM_GRACE",
    "claims",
    "drop_claim",
    "live_claim",
    "move_aside",
    "remove_tree",
    "sweep_aside",
    "take_claim",
]

CLAIM: Final = "claim"
#: A claim is held for a few system calls; one older than this was abandoned by a crash.
CLAIM_GRACE: Final = 2.0


def remove_tree(path: str) -> None:
    """Delete a lock directory that has been renamed aside."""
    try:
        # Almost always only the owner record: try that before listing the folder.
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(path, OWNER_FILE))
            os.rmdir(path)
            return
        # Otherwise claims (symbolic links), or a heartbeat's temp file.
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def claims(dirfd: int) -> list[str]:
    """The claims in a lock instance, in the order they were taken."""
    names = [n for n in os.listdir(dirfd) if n == CLAIM or n.startswith(CLAIM + ".")]
    return sorted(names, key=lambda n: 1 if n == CLAIM else int(n.rpartition(".")[2] or 0))


def live_claim(dirfd: int) -> bool:
    """Whether some process that may still be running holds a claim in the instance."""
    for name in claims(dirfd):
        try:
            tag = os.readlink(name, dir_fd=dirfd)
        except FileNotFoundError:
            continue
        if claim_maker_alive(tag) is not False:
            return True
    return False


def sweep_aside(path: str) -> None:
    """Delete instances of the lock at ``path`` renamed aside by a process that died
    before deleting them (its kill landed between the rename and the removal).

    Aside names are unique and nobody reads them: deleting one that its renamer is
    deleting at the same time is harmless (both ignore what is already gone).
    """
    folder, name = os.path.split(path)
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return
    for entry in names:
        token, dot, kind = entry[len(name) + 1 :].partition(".")
        if (
            entry.startswith(name + ".")
            and dot
            and kind in ("broken", "released")
            and len(token) == 12
            and all(c in "0123456789abcdef" for c in token)
        ):
            remove_tree(os.path.join(folder, entry))


def take_claim(dirfd: int, lease: float) -> str | None:
    """Take the removal claim of the lock instance behind ``dirfd``.

    A claim is a symbolic link whose target names its maker, so it is made
    with its identity in one atomic step. Returns the claim's name, or None
    when someone else holds it (or the instance is being deleted). Working
    through the instance's descriptor keeps claim and undo on that instance,
    wherever it has moved. Raises OSError when the claim cannot be made at all.
    """
    index = 1
    while True:
        name = CLAIM if index == 1 else f"{CLAIM}.{index}"
        try:
            os.symlink(claim_tag(), name, dir_fd=dirfd)
            return name
        except FileExistsError:
            pass
        except (FileNotFoundError, NotADirectoryError):
            return None  # the instance is being deleted
        # Any other error propagates: the caller names the lock in its message.
        try:
            os.stat(f"{CLAIM}.{index + 1}", dir_fd=dirfd, follow_symlinks=False)
            index += 1  # a later claim took this one over: look at that one
            continue
        except FileNotFoundError:
            pass
        except OSError:
            return None
        try:
            tag = os.readlink(name, dir_fd=dirfd)
            made = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue  # undone meanwhile: try this one again
        except OSError:
            return None
        alive = claim_maker_alive(tag)
        # Take over only the claim of a process that is provably dead (spec/: taking
        # over by age lets a breaker that merely stalled move the next holder's
        # lock), or, for a maker on another host, one older than a lease.
        stale = time.time() - made > max(lease, CLAIM_GRACE)
        if alive is False or (alive is None and stale):
            index += 1  # one further, which again only one process can do
            continue
        return None


def drop_claim(dirfd: int, claim: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(claim, dir_fd=dirfd)


def move_aside(path: str, kind: str) -> str:
    """Rename the instance at ``path`` to a unique name beside it, in one step.

    The name is ``<path>.<12 hex>.<kind>``, which :func:`sweep_aside` recognises
    when the process that moved it dies before deleting it.
    """
    aside = f"{path}.{secrets.token_hex(6)}.{kind}"
    os.rename(path, aside)
    return aside
