"""Model checks of the lock protocol: spec/lock.pml, verified with SPIN.

Each check compiles one variant of the model (``spin -D...``) into a verifier
(``pan``), runs it in a temporary directory and reads its report. Checks that
must hold expect ``errors: 0`` from a complete search; checks of known-bad
designs expect SPIN to find the named violation (``errors: 1``), which shows
that the properties can fail at all.

spec/README.md has the same commands for running by hand, and the results.
Without ``spin`` (or a C compiler) the checks are skipped, except when
``CI=true``: CI installs spin, so there a missing tool is an error.
With ``STATESTORE_LONG=1`` the passing checks use larger bounds (minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

SPEC = Path(__file__).resolve().parent.parent / "spec" / "lock.pml"
LONG = os.environ.get("STATESTORE_LONG") == "1"
TIMEOUT = 600 if LONG else 240  # seconds per SPIN step; the usual total is ~40 s


@dataclass(frozen=True)
class Check:
    name: str
    defines: tuple[str, ...]
    liveness: bool = False
    #: None: the property must hold. Otherwise a regex that pan's report must match.
    violation: str | None = None
    #: Violations are found in a few thousand states: compile fast (-O0).
    #: Searches of millions of states pay for -O2's longer compile.
    optimize: str = "-O1"


def _pauses(short: int, long: int | None) -> tuple[str, ...]:
    """Bound on stalls per run; None means unbounded."""
    n = long if LONG else short
    return () if n is None else (f"-DPAUSES={n}",)


def _mutex_broken() -> str:
    return r"assertion violated\s+!\(mutual_exclusion_broken\)"


HOLDS = [
    # Properties 1, 2 (and the model's own sanity checks), exhaustive for
    # 3 processes, 1 crash, up to 3 stalls (unbounded stalls in long mode).
    Check("safety", _pauses(3, None), optimize="-O2"),
    # Property 3: under weak fairness a dead holder's lock is taken over.
    Check(
        "liveness-dead-holder-lock-taken",
        ("-DLIVENESS", *_pauses(2, 3)),
        liveness=True,
        optimize="-O2",
    ),
    # A pre-commit check that waits while a claim is being decided never
    # refuses a holder whose lock is intact.
    Check(
        "waiting-precommit-never-refuses-valid-holder",
        ("-DCHECK_REFUSALS", "-DPRECOMMIT_WAITS", *_pauses(2, 3)),
    ),
    # Claims whose maker is provably dead may be taken over: still safe ...
    Check(
        "dead-claim-takeover-safety",
        ("-DCRASH_IN_CLAIM", "-DCLAIM_TAKEOVER_DEAD", *_pauses(1, 3)),
    ),
    # ... and a crash inside a claim no longer wedges the lock.
    Check(
        "dead-claim-takeover-liveness",
        ("-DLIVENESS", "-DCRASH_IN_CLAIM", "-DCLAIM_TAKEOVER_DEAD", *_pauses(1, 3)),
        liveness=True,
    ),
]

VIOLATED = [
    # Property 4: breaking by rmdir-then-mkdir lets two processes in. The search
    # may first meet the same fault as a release that moves a lock that is not
    # its own (the breaker removed the releaser's instance under it).
    Check(
        "broken-rmdir-breaks-mutual-exclusion",
        ("-DBROKEN_RMDIR",),
        violation=r"assertion violated\s+!\((mutual_exclusion_broken|release_moved_other)\)",
        optimize="-O0",
    ),
    # Property 5: the residual window. A holder that stalls between its last
    # pre-commit check and its commit rename commits over a newer holder.
    Check(
        "stall-after-precommit-check-commits-stale",
        ("-DSUSPEND_AFTER_CHECK",),
        violation=r"assertion violated\s+!\(stale_commit\)",
        optimize="-O0",
    ),
    # Finding: after writing owner.json, "L is still my inode" is not enough.
    Check(
        "acquire-without-claim-check-breaks-mutual-exclusion",
        ("-DACQ_INODE_ONLY",),
        violation=_mutex_broken(),
        optimize="-O0",
    ),
    # Finding: a heartbeat that checks before it writes revives a lapsed lease
    # while a breaker is already committed to removing the lock.
    Check(
        "heartbeat-check-before-write-breaks-mutual-exclusion",
        ("-DHB_CHECK_BEFORE_WRITE",),
        violation=_mutex_broken(),
        optimize="-O0",
    ),
    # Finding: a crash while owning a claim leaves a claim nobody may remove.
    Check(
        "crash-in-claim-wedges-lock",
        ("-DLIVENESS", "-DCRASH_IN_CLAIM", "-DPAUSES=0"),
        liveness=True,
        violation=r"acceptance cycle",
        optimize="-O0",
    ),
    # Finding: taking over a claim because it is old lets a stalled claimer's
    # rename(L) remove the next holder's fresh lock.
    Check(
        "claim-takeover-by-age-breaks-mutual-exclusion",
        ("-DCLAIM_TAKEOVER",),
        violation=_mutex_broken(),
        optimize="-O0",
    ),
    # The residual window of a release without a claim: a releaser that stalls
    # past its lease between its token check and its rename moves the next
    # holder's lock. Without the stall, the default model shows it safe.
    Check(
        "stall-in-claim-free-release-moves-another-lock",
        ("-DSUSPEND_IN_RELEASE",),
        violation=r"assertion violated\s+!\(release_moved_other\)",
        optimize="-O0",
    ),
    # Finding: a transient claim (a breaker that will undo, a releaser that
    # lost its lock) makes the pre-commit check refuse a valid holder.
    Check(
        "transient-claim-refuses-valid-holder",
        ("-DCHECK_REFUSALS",),
        violation=r"assertion violated\s+!\(valid_holder_refused\)",
        optimize="-O0",
    ),
]


@dataclass
class Result:
    check: Check
    commands: list[str]
    output: str
    trail: bool

    def report(self) -> str:
        return "\n".join(["$ " + c for c in self.commands]) + "\n" + self.output


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name!r} is not installed (Debian: apt-get install spin gcc)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must install it", pytrace=False)
        pytest.skip(message)
    return path


def _run(check: Check, workdir: Path, spin: str, cc: str) -> Result:
    """spin -a, cc, pan: all inside workdir, on a copy of the model."""
    model = workdir / SPEC.name
    shutil.copyfile(SPEC, model)
    steps = [
        [spin, *check.defines, "-a", model.name],
        [cc, check.optimize, *([] if check.liveness else ["-DSAFETY"]), "-o", "pan", "pan.c"],
        [
            "./pan",
            # Unbounded stalls make deep searches (3.3 million steps at the last count).
            "-m5000000" if LONG else "-m200000",
            *(["-a", "-f"] if check.liveness else []),
        ],
    ]
    commands: list[str] = []
    output = ""
    for argv in steps:
        commands.append(" ".join(Path(a).name if a in (spin, cc) else a for a in argv))
        proc = subprocess.run(
            argv,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        output = proc.stdout + proc.stderr
        # pan exits 0 whether or not it found errors; the others must succeed.
        if proc.returncode != 0 and argv[0] != "./pan":
            break
    return Result(check, commands, output, (workdir / f"{model.name}.trail").exists())


@pytest.fixture(scope="module")
def spin_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[Result]]]:
    """Run every selected check at once, a few in parallel."""
    spin = _tool("spin")
    cc = _tool("gcc") if shutil.which("gcc") else _tool("cc")
    wanted: dict[str, Check] = {}
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is request.module and callspec is not None:
            check = callspec.params.get("check")
            if isinstance(check, Check):
                wanted[check.name] = check
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {
            name: pool.submit(_run, check, tmp_path_factory.mktemp(name), spin, cc)
            for name, check in wanted.items()
        }
        yield futures
        for f in futures.values():
            f.cancel()


def _result(spin_results: dict[str, Future[Result]], check: Check) -> Result:
    return spin_results[check.name].result(timeout=4 * TIMEOUT)


def _errors(output: str) -> int | None:
    m = re.search(r"errors: (\d+)", output)
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("check", HOLDS, ids=lambda c: c.name)
def test_property_holds(check: Check, spin_results: dict[str, Future[Result]]) -> None:
    res = _result(spin_results, check)
    out = res.report()
    assert _errors(res.output) == 0, f"SPIN found a violation (or did not run):\n{out}"
    # A search cut short proves nothing.
    assert "max search depth too small" not in res.output, f"search incomplete:\n{out}"
    assert "Search not completed" not in res.output, f"search incomplete:\n{out}"
    assert "states, stored" in res.output, f"no state count in the report:\n{out}"


@pytest.mark.parametrize("check", VIOLATED, ids=lambda c: c.name)
def test_counterexample_found(check: Check, spin_results: dict[str, Future[Result]]) -> None:
    res = _result(spin_results, check)
    out = res.report()
    errors = _errors(res.output)
    assert errors is not None and errors > 0, f"SPIN found no violation:\n{out}"
    assert check.violation is not None
    assert re.search(check.violation, res.output), (
        f"SPIN found a different violation than {check.violation!r}:\n{out}"
    )
    assert res.trail, f"no counterexample trail was written:\n{out}"


def test_every_variant_is_documented() -> None:
    """spec/README.md names every check, so a reader can rerun it by hand."""
    readme = (SPEC.parent / "README.md").read_text(encoding="utf-8")
    missing = [c.name for c in HOLDS + VIOLATED if c.name not in readme]
    assert not missing, f"spec/README.md does not mention: {missing}"
