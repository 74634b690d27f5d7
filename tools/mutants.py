"""Mutation runner: does the test suite notice when a protocol step is left out?

Each mutation is a list of (old snippet, new snippet) edits of one source file.
For each, in turn, the repository (``src/``, ``tests/``, ``spec/``, ``docs/``
and the project files; never ``.git`` or a virtual environment) is copied to a
temporary folder, the edits are applied to the copy, and a pytest selection
runs there. The working tree is never modified.

The copy is imported through a private virtual environment whose only paths
are the copy's ``src/`` and the site-packages of the given interpreter (so a
test that starts a Python child with its own ``PYTHONPATH``, like the kill -9
test's fork server, still runs the mutated code); ``PYTHONPATH`` points at the
copy as well.

A snippet that is not in the file (the code moved on) is reported as
"snippet not found", one found more than once as "snippet ambiguous": re-point
it, nothing else stops.

    python tools/mutants.py                  # every mutation, the default selection
    python tools/mutants.py --pins           # each against the test that pins it,
                                             # and that test without the mutation
    python tools/mutants.py --only 1,5 -- tests/test_lock.py   # a selection of your own
    python tools/mutants.py --list

Outcomes: "caught" (some test failed), "survived" (all passed), "timeout", or
"error" (pytest could not run the selection: a mutation that breaks the import
is reported so, not as caught).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # --root changes it
DEFAULT_SELECTION = (
    "tests/test_protocol_steps.py",  # first: fast, and it pins most of the steps
    "tests/test_lock.py",
    "tests/test_store.py",
    "tests/test_faults.py",
    "tests/test_crash.py",
)
PYTEST_FLAGS = ("-x", "-q", "-p", "no:cacheprovider")
COPIED = ("src", "tests", "spec", "docs", "pyproject.toml", "README.md", "CHANGELOG.md")
IGNORED = shutil.ignore_patterns(
    "__pycache__", "*.pyc", ".mypy_cache", ".pytest_cache", ".ruff_cache", "*.egg-info"
)


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]
    pin: str | None = None  # the test that fails with it: tests/<file>.py::<name>


CR = "src/statestore/_lock/create.py"
OB = "src/statestore/_lock/observe.py"
RL = "src/statestore/_lock/release.py"
LS = "src/statestore/_lock/lease.py"
C = "src/statestore/_lock/claim.py"
LV = "src/statestore/_lock/liveness.py"
A = "src/statestore/_atomic.py"
S = "src/statestore/_document.py"
F = "src/statestore/backends/file.py"
P = "tests/test_protocol_steps.py::"

MUTATIONS: tuple[Mutation, ...] = (
    # ---- the nine that survived the whole suite at 831d08f
    Mutation(
        "breaker skips the re-check after its claim",
        RL,
        (
            (
                "            now = observe(path, key)\n            same = now.ino",
                "            now = seen\n            same = now.ino",
            ),
        ),
        P + "test_breaker_re_inspects_after_taking_its_claim",
    ),
    Mutation(
        "creator skips the post-publish settle",
        CR,
        (
            (
                "        state = settle(path, dirfd, ino, patience=2 * CLAIM_GRACE)",
                '        state = "ours"',
            ),
        ),
        P + "test_creator_settles_after_publishing_its_record",
    ),
    Mutation(
        "verify() ignores an expired lease",
        LS,
        (
            (
                "    if now >= held.owner.expires_at:\n        raise LockCompromisedError(",
                "    if False:\n        raise LockCompromisedError(",
            ),
        ),
        P + "test_verify_refuses_once_the_lease_has_run_out",
    ),
    Mutation(
        "refresh believes a new expiry without settling",
        LS,
        (
            (
                "        state = settle(path, held.dirfd, held.ino, patience=0.0)",
                '        state = "ours"',
            ),
        ),
        P + "test_heartbeat_believes_a_new_expiry_only_after_settling",
    ),
    Mutation(
        "fast release without the token check",
        RL,
        (
            (
                "    if _lost(path, held):\n"
                '        log.warning("lock %s was lost before release (lease expired)", path)\n'
                "        return None\n",
                "    if False:\n        return None\n",
            ),
        ),
        P + "test_release_without_a_claim_checks_its_token_first",
    ),
    Mutation(
        "owner record written without O_EXCL",
        CR,
        (
            (
                "            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,\n"
                "            0o644,\n            dir_fd=dirfd,",
                "            os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,\n"
                "            0o644,\n            dir_fd=dirfd,",
            ),
        ),
        P + "test_owner_record_is_created_exclusively",
    ),
    Mutation(
        "garbage collector never re-enabled",
        S,
        (
            (
                "                if _gc_was_enabled:\n                    gc.enable()",
                "                pass",
            ),
        ),
        P + "test_collector_is_on_again_after_every_store_call",
    ),
    # ---- the lock: more steps
    Mutation(
        "settle ignores claims",
        CR,
        (('        if not claimed:\n            return "ours"', '        return "ours"'),),
        P + "test_creator_settle_sees_a_breaker_that_finishes_between_its_two_looks",
    ),
    Mutation(
        "breaker skips the inode check of its descriptor",
        RL,
        (
            (
                "        if (st.st_dev, st.st_ino) != seen.ino:\n            return False",
                "        if False:\n            return False",
            ),
        ),
    ),
    Mutation(
        "_lost() drops the token comparison (both releases)",
        RL,
        (
            (
                "        return held.token_mark not in read_owner_at(path)",
                "        read_owner_at(path)\n        return False",
            ),
        ),
        P + "test_release_without_a_claim_checks_its_token_first",
    ),
    Mutation(
        "verify() drops the token comparison",
        LS,
        (
            (
                "            ours = held.token_mark in read_owner_at(path)",
                "            ours = bool(read_owner_at(path))",
            ),
        ),
    ),
    Mutation(
        "a lock without a record is stale at once (no creation grace)",
        OB,
        (
            (
                '            age > CREATE_GRACE,\n            f"no owner record',
                '            True,\n            f"no owner record',
            ),
        ),
        "tests/test_lock.py::test_missing_owner_record_is_a_lock_being_created",
    ),
    Mutation(
        "no clock-skew allowance for other hosts",
        OB,
        (
            (
                "    expiry = owner.expires_at + (CLOCK_SKEW if alive is None else 0.0)",
                "    expiry = owner.expires_at",
            ),
        ),
        "tests/test_lock.py::test_other_host_is_broken_only_after_its_lease_and_skew",
    ),
    Mutation(
        "release wakes no waiter",
        RL,
        (("            queue.wake_first()", "            pass"),),
    ),
    # ---- claims
    Mutation(
        "claims taken over by age (spec: CLAIM_TAKEOVER)",
        C,
        (
            (
                "        if alive is False or (alive is None and stale):",
                "        if alive is False or stale:",
            ),
        ),
        "tests/test_lock.py::test_a_claim_of_a_live_process_is_never_taken_over",
    ),
    Mutation(
        "a dead breaker's claim is never taken over",
        C,
        (
            (
                "        if alive is False or (alive is None and stale):",
                "        if alive is None and stale:",
            ),
        ),
        "tests/test_lock.py::test_a_claim_left_by_a_dead_breaker_is_taken_over_at_once",
    ),
    Mutation(
        "live_claim ignores every claim",
        C,
        (
            (
                "        if claim_maker_alive(tag) is not False:\n            return True",
                "        if False:\n            return True",
            ),
        ),
        P + "test_heartbeat_believes_a_new_expiry_only_after_settling",
    ),
    # ---- liveness
    Mutation(
        "a reused pid is taken for its old process (start time ignored)",
        LV,
        (("    return start == start_time", "    return True"),),
        "tests/test_lock.py::test_reused_pid_with_another_start_time_is_dead",
    ),
    Mutation(
        "a zombie holder counts as alive",
        LV,
        (('    if state in ("Z", "X"):', "    if False:"),),
        "tests/test_lock.py::test_holder_killed_with_sigkill_is_replaced_within_a_second",
    ),
    Mutation(
        "identity not recomputed after fork",
        LV,
        (
            ("    if _identity is None or _identity.pid != pid:", "    if _identity is None:"),
            ("    global _identity\n    _identity = None\n", "    global _identity\n"),
        ),
        P + "test_a_forked_child_records_its_own_identity",
    ),
    # ---- the same two liveness steps, in the rule where another boot waits for its
    # lease (not in 831d08f: reported as "snippet not found" until that rule lands)
    Mutation(
        "liveness ignores the boot id (rule: another boot waits)",
        LV,
        (
            (
                "    if host != me.host or not (boot_id and boot_id == me.boot_id):\n"
                "        return None",
                "    if host != me.host:\n        return None",
            ),
        ),
        P + "test_another_boot_is_not_judged_alive_by_its_pid",
    ),
    Mutation(
        "liveness ignores the pid namespace (rule: another boot waits)",
        LV,
        (("    if not (pid_ns and pid_ns == me.pid_ns):\n        return None\n", ""),),
        P + "test_another_pid_namespace_is_not_judged_by_its_pid",
    ),
    # ---- the write path
    Mutation(
        "no fsync of the temporary file",
        A,
        (
            (
                '                what = "fsync"\n                _fsync(fd)',
                '                what = "fsync"',
            ),
        ),
        "tests/test_faults.py::test_power_loss_at_any_point_of_a_durable_save_leaves_old_or_new",
    ),
    Mutation(
        "folder fsync before the rename instead of after",
        A,
        (
            (
                "        os.replace(tmp, target)\n",
                "        _fsync_dir(folder)\n        os.replace(tmp, target)\n",
            ),
            (
                "        try:\n            _fsync_dir(folder)\n        except OSError as e:",
                "        try:\n            pass\n        except OSError as e:",
            ),
        ),
        "tests/test_faults.py::test_power_loss_at_any_point_of_a_durable_save_leaves_old_or_new",
    ),
    Mutation(
        "temporary file created without O_EXCL",
        A,
        (
            (
                "    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC",
                "    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC",
            ),
        ),
    ),
    Mutation(
        "no pre-commit check before the rename",
        A,
        (("            before_replace()", "            pass"),),
        "tests/test_lock.py::test_a_broken_lock_is_noticed_before_the_commit",
    ),
    Mutation(
        "a symbolic link is replaced, not followed",
        A,
        (
            (
                "            link = os.readlink(path)",
                '            raise OSError(errno.EINVAL, "not followed")',
            ),
        ),
    ),
    Mutation(
        "the file backend never verifies the lock",
        F,
        (("before_replace=self._held.verify)", "before_replace=None)"),),
        "tests/test_lock.py::test_a_broken_lock_is_noticed_before_the_commit",
    ),
    # ---- the store
    Mutation(
        "fast path takes files that may hold NaN",
        S,
        (
            (
                '        if not raw.startswith(b"{\\n") or _may_hold_constants(raw):',
                '        if not raw.startswith(b"{\\n"):',
            ),
        ),
    ),
    Mutation(
        "a large file of the same length is taken as unchanged",
        S,
        (
            (
                "            return self.digest.startswith(_length(data)) and "
                "digest(data) == self.digest",
                "            return self.digest.startswith(_length(data))",
            ),
        ),
    ),
    # ---- the transaction core, the async store and state folders
    Mutation(
        "an async plain fn's result is committed though the task was cancelled meanwhile",
        "src/statestore/_async.py",
        (
            (
                "            if gave_up.is_set():  # the task was cancelled while fn ran: "
                "do not commit\n                raise _Abandon",
                "            pass",
            ),
        ),
        "tests/test_async.py::test_cancelled_while_a_plain_fn_runs_in_the_thread",
    ),
    Mutation(
        "a sync call does not see the lock an async operation holds for its thread",
        "src/statestore/_store.py",
        (("                lock=lambda: lock_identity(storage.lock),\n", ""),),
        "tests/test_core.py::test_a_blocking_call_inside_an_async_update_is_refused_not_waited_out",
    ),
    Mutation(
        "an uncontended async acquire starts a thread",
        "src/statestore/_lock/aio.py",
        (
            (
                "                handle = lock._take(0.0, None, None, task)",
                "                raise LockTimeout(lock.path)",
            ),
        ),
        "tests/test_core.py::test_an_uncontended_async_update_starts_no_thread_of_its_own",
    ),
    Mutation(
        "a file store ignores its folder's marker",
        F,
        (("            st = os.lstat(marker)\n", "            raise FileNotFoundError(marker)\n"),),
        "tests/test_folder.py::test_the_folder_is_declared_on_disk_and_plain_stores_take_its_lock",
    ),
    Mutation(
        "a session in a folder reads before completing an unfinished group",
        F,
        (
            (
                "                recover(folder)  # what this session reads must not "
                "predate a group\n",
                "                pass\n",
            ),
        ),
        "tests/test_folder.py::test_a_dead_holders_unfinished_group_is_completed_before_a_plain_store_reads",
    ),
    Mutation(
        "a single save in a folder bypasses the journal",
        F,
        (
            (
                "        if self.folder is not None:\n            # Through the folder's journal",
                "        if False:\n            # Through the folder's journal",
            ),
        ),
        "tests/test_folder.py::test_snapshots_are_consistent_across_single_document_saves",
    ),
)


# ------------------------------------------------------------------ machinery


def apply(text: str, edits: Sequence[tuple[str, str]]) -> tuple[str | None, str]:
    """The mutated text, or None and why not."""
    for i, (old, new) in enumerate(edits, 1):
        n = text.count(old)
        if n != 1:
            where = f" (edit {i})" if len(edits) > 1 else ""
            return None, ("snippet not found" if n == 0 else f"snippet ambiguous ({n}x)") + where
        text = text.replace(old, new)
    return text, ""


def make_env(work: Path, python: str) -> tuple[str, dict[str, str]]:
    """A private virtual environment that imports the copy at ``work/repo/src``."""
    venv = work / "venv"
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True)
    out = subprocess.run(
        [python, "-c", "import site, sys; print('\\n'.join(site.getsitepackages()))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    inner = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Path lines only: the .pth files of those folders (an editable install of the
    # working tree) are not processed, so the working tree's src is never imported.
    Path(inner, "statestore_mutants.pth").write_text(
        "\n".join([str(work / "repo" / "src"), *out]) + "\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PYTHONPATH"] = str(work / "repo" / "src")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return str(venv / "bin" / "python"), env


def fresh_copy(work: Path) -> Path:
    repo = work / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir()
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=IGNORED, symlinks=True)
        elif src.exists():
            shutil.copy2(src, repo / name)
    return repo


def check_import(python: str, env: dict[str, str], repo: Path) -> None:
    for extra in ({}, {"PYTHONPATH": str(repo / "tests")}):  # as a child with its own path
        where = subprocess.run(
            [python, "-c", "import statestore; print(statestore.__file__)"],
            env={**env, **extra},
            cwd=repo / "tests",
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not where.startswith(str(repo)):
            sys.exit(f"the copy is not what gets imported ({where!r}); refusing to run")


FAILED_RE = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


@dataclass
class Result:
    outcome: str
    detail: str
    seconds: float


def run_tests(
    python: str, env: dict[str, str], repo: Path, selection: Sequence[str], timeout: float
) -> Result:
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [python, "-m", "pytest", *PYTEST_FLAGS, *selection],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return Result("timeout", f"over {timeout:.0f} s", time.monotonic() - started)
    took = time.monotonic() - started
    output = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return Result("survived", "", took)
    if proc.returncode == 1:
        failed = FAILED_RE.findall(output)
        return Result("caught", failed[0] if failed else "(see pytest output)", took)
    tail = " | ".join(output.strip().splitlines()[-3:])
    return Result("error", f"pytest exit {proc.returncode}: {tail[:200]}", took)


def main(argv: Sequence[str] | None = None) -> int:
    global ROOT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "selection",
        nargs="*",
        help="pytest arguments (default: %(default)s)",
        default=list(DEFAULT_SELECTION),
    )
    parser.add_argument("--only", help="numbers of the mutations to run, e.g. 1,2,9")
    parser.add_argument(
        "--pins",
        action="store_true",
        help="run each mutation against only the test that pins it, and "
        "that test without the mutation",
    )
    parser.add_argument("--list", action="store_true", help="list the mutations and stop")
    parser.add_argument(
        "--python", default=sys.executable, help="the interpreter whose packages run the tests"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="the tree to copy and mutate (default: this repository)",
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the run of the selection without any mutation",
    )
    args = parser.parse_args(argv)
    ROOT = args.root.resolve()

    chosen = list(enumerate(MUTATIONS, 1))
    if args.only:
        wanted = {int(n) for n in args.only.split(",")}
        chosen = [(i, m) for i, m in chosen if i in wanted]
    if args.list:
        for i, m in chosen:
            print(f"{i:3}  {m.file:32} {m.name}" + (f"\n     pinned by {m.pin}" if m.pin else ""))
        return 0
    if args.pins:
        chosen = [(i, m) for i, m in chosen if m.pin]

    rows: list[tuple[int, Mutation, Result, Result | None]] = []
    with tempfile.TemporaryDirectory(prefix="statestore-mutants-") as tmp:
        work = Path(tmp)
        python, env = make_env(work, args.python)
        check_import(python, env, fresh_copy(work))
        if not args.pins and not args.no_baseline:
            base = run_tests(python, env, fresh_copy(work), args.selection, args.timeout)
            print(
                f"baseline (no mutation): {base.outcome} in {base.seconds:.0f} s {base.detail}",
                file=sys.stderr,
                flush=True,
            )
            if base.outcome != "survived":
                print("the selection fails without any mutation: fix that first", file=sys.stderr)
                return 2
        for i, m in chosen:
            repo = fresh_copy(work)
            target = repo / m.file
            if target.exists():
                mutated, why = apply(target.read_text(), m.edits)
            else:
                mutated, why = None, "file not found"
            if mutated is None:
                rows.append((i, m, Result(why, "", 0.0), None))
            else:
                selection = [m.pin] if args.pins and m.pin else args.selection
                control = None
                if args.pins:  # the same test, unmutated: it must pass
                    control = run_tests(python, env, repo, selection, args.timeout)
                target.write_text(mutated)
                rows.append((i, m, run_tests(python, env, repo, selection, args.timeout), control))
            _, _, res, ctl = rows[-1]
            print(
                f"{i:3} {res.outcome:9} {res.seconds:5.0f} s  {m.name}  {res.detail}"
                + (f"  [without it: {ctl.outcome}]" if ctl else ""),
                file=sys.stderr,
                flush=True,
            )

    print()
    if args.pins:
        print("| # | mutation | file | pinned by | fails with it | passes without |")
        print("| ---: | --- | --- | --- | --- | --- |")
        for i, m, res, ctl in rows:
            pin = (m.pin or "").split("::")[-1]
            fails = "yes" if res.outcome == "caught" else res.outcome
            passes = "-" if ctl is None else "yes" if ctl.outcome == "survived" else ctl.outcome
            print(
                f"| {i} | {m.name} | `{m.file.rpartition('/')[2]}` | `{pin}` | {fails} | {passes} |"
            )
    else:
        print(f"selection: {' '.join(args.selection)}")
        print("| # | mutation | file | result | first failing test | s |")
        print("| ---: | --- | --- | --- | --- | ---: |")
        for i, m, res, _ in rows:
            print(
                f"| {i} | {m.name} | `{m.file.rpartition('/')[2]}` | {res.outcome} "
                f"| {res.detail.split('::')[-1] if res.outcome == 'caught' else res.detail} "
                f"| {res.seconds:.0f} |"
            )
        caught = sum(1 for _, _, r, _ in rows if r.outcome == "caught")
        print(f"\n{caught} of {len(rows)} caught")
    survivors = sum(1 for _, _, r, _ in rows if r.outcome != "caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
