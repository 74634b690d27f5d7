/*
 * lock.pml -- Promela model of the statestore directory lock, for SPIN.
 *
 * See spec/README.md for the commands and the results, docs/lock-model.md
 * for what the results mean for users.
 *
 * What is modelled
 *   L            the lock path; it names one "instance" (a directory made by
 *                mkdir(L)) or nothing.
 *   instance k   a record: creator, owner.json written?, lease in owner.json
 *                still live?, older than the creation grace period?, has a
 *                `claim` subdirectory (and who made it)?
 *   process p    three copies of proctype P, each looping forever:
 *                acquire -> hold (heartbeat / commit / pause) -> release.
 *   system calls each mkdir / rename / rmdir / stat+read is one atomic step.
 *                A call on a path (mkdir(L/claim), rename(L, aside)) acts on
 *                WHATEVER instance is at L when it runs; a call through the
 *                creator's directory fd acts on the creator's own instance,
 *                wherever it has been moved.
 *   time         abstract events taken by the process that is slow: "stalled
 *                past the creation grace" (between mkdir and writing
 *                owner.json) and "stalled past the lease" (the holder stopped
 *                refreshing).  A crash makes a process dead for good.
 *
 * A holder has two views of its lease:
 *   ilive[k]     the expiry written in owner.json of instance k (what
 *                breakers read);
 *   mylease[p]   the holder's own belief "my lease has not run out" (what the
 *                pre-commit check reads).
 * A stall past the lease clears both: the holder computes its expiry from a
 * clock reading taken before it writes the record, so its own view never
 * outlives the record.  (Clock skew between hosts is out of scope: the code
 * adds a margin for holders on other hosts.)
 *
 * Variants (spin -DNAME ...):
 *   (none)               the protocol, with the post-write checks found
 *                        necessary (spec/README.md, "Findings"): after writing
 *                        owner.json -- at acquire and at every heartbeat -- the
 *                        writer checks that L is still its instance AND that
 *                        the instance has no claim, and only then trusts the
 *                        record it wrote.
 *   ACQ_INODE_ONLY       acquire checks only "L is still my inode" after
 *                        writing owner.json (no claim check)
 *   HB_CHECK_BEFORE_WRITE
 *                        heartbeat checks "L is still mine" first, then writes
 *                        and adopts the new expiry (no check after the write)
 *   AS_DESCRIBED         both of the above: no post-write claim check at all
 *   BROKEN_RMDIR         break a stale lock by removing L and retrying mkdir
 *                        (no claim, no rename aside)
 *   SUSPEND_AFTER_CHECK  the pre-commit check and the commit rename are two
 *                        steps, and the holder may stall between them
 *   CRASH_IN_CLAIM       processes may also crash while they own a claim
 *                        (between mkdir(claim) and the rename / rmdir)
 *   CLAIM_TAKEOVER       a claim older than a claim grace period counts as
 *                        abandoned: another process takes over one level deeper
 *                        (mkdir(L/claim/claim)); claimers may stall past it
 *   CLAIM_TAKEOVER_DEAD  a claim names its maker; a claim whose maker is
 *                        provably dead is ignored and may be taken over
 *   CHECK_REFUSALS       also check that the pre-commit check never refuses a
 *                        holder whose instance is at L and whose lease is live
 *   PRECOMMIT_WAITS      the pre-commit check waits while a claim is present
 *                        in our live instance, instead of failing at once
 *   SUSPEND_IN_RELEASE   a release without a claim (taken while the lease
 *                        runs) may stall past the lease between its token
 *                        check and its rename
 *   LIVENESS             compile the LTL property (run pan -a -f)
 *   PAUSES=n             at most n stalls in a run (the liveness check needs a
 *                        bound: "unlucky forever" is not a protocol failure)
 *   MAXCRASH=n           at most n crashes in a run (default 1)
 */

#ifdef AS_DESCRIBED
#define ACQ_INODE_ONLY
#define HB_CHECK_BEFORE_WRITE
#endif

#define N  3            /* processes */
#define NI 6            /* instance ids 1..5, 0 = none.  Five always suffice: at
                           an mkdir, at most 2 own + 2 inspected ids are live */

#ifndef MAXCRASH
#define MAXCRASH 1
#endif

/* ---- the file system ---------------------------------------------------- */
byte L;                 /* instance at the lock path, 0 = no directory */
byte ipid[NI];          /* creator of the instance */
bool irec[NI];          /* owner.json present */
bool ilive[NI];         /* lease in owner.json not yet expired */
bool iold[NI];          /* directory older than the creation grace period */
byte iclaim[NI];        /* claim subdirectories: bit p set = process p made one
                           (more than one bit only with CLAIM_TAKEOVER: nested) */
bool iclold[NI];        /* the deepest claim is older than the claim grace period */

/* ---- the processes ------------------------------------------------------ */
byte own[N];            /* instance this process created (open dir fd), 0 = none */
byte insp[N];           /* inode remembered by an inspection, 0 = none */
bool holding[N];        /* believes it holds the lock */
bool mylease[N];        /* believes its lease has not run out */
bool dead[N];
bool compromised[N];    /* LockCompromisedError raised in this session */
byte ncrash;

/* Ghost flags, one per checked property.  A flag is set only at the moment
   its property breaks and is asserted false right away, so pan's message
   names the property: "assertion violated !(mutual_exclusion_broken)". */
bool mutual_exclusion_broken;   /* property 1 */
bool commit_after_lost;         /* property 2 */
bool stale_commit;              /* property 5 */
bool valid_holder_refused;      /* CHECK_REFUSALS */
bool claim_not_pinned;          /* sanity: a claim pins its instance at L */
bool release_moved_other;       /* property 6: a release moves only its own instance */

#ifdef PAUSES
byte npause;
#define CANPAUSE (npause < PAUSES)
#define TICK     npause++
#else
#define CANPAUSE true
#define TICK     skip
#endif

/* what an inspection concludes about instance k */
#define STALE(k) (irec[k] -> (dead[ipid[k]] || !ilive[k]) : iold[k])

#define LIVEHOLD(p)   (holding[p] && mylease[p] && !dead[p])
#define OTHER_LIVE(p) ((p != 0 && LIVEHOLD(0)) || (p != 1 && LIVEHOLD(1)) || \
                       (p != 2 && LIVEHOLD(2)))
#define MUTEX (!(LIVEHOLD(0) && LIVEHOLD(1)) && !(LIVEHOLD(0) && LIVEHOLD(2)) && \
               !(LIVEHOLD(1) && LIVEHOLD(2)))

#define CHECK(flag, bad) \
    if :: bad -> flag = true :: else -> skip fi; \
    assert(!flag)

#if defined(BROKEN_RMDIR) || defined(CLAIM_TAKEOVER)
#define PINNED(c) skip      /* these designs do not pin; see what follows */
#else
#define PINNED(c) CHECK(claim_not_pinned, L != c)
#endif

#define REF(k) (L == k || own[0] == k || own[1] == k || own[2] == k || \
                insp[0] == k || insp[1] == k || insp[2] == k)

/* forget instances nobody refers to any more (keeps the state space small) */
#define GC \
    k = 1; \
    do \
    :: k < NI && !REF(k) -> \
        ipid[k] = 0; irec[k] = false; ilive[k] = false; iold[k] = false; \
        iclaim[k] = 0; iclold[k] = false; k++ \
    :: k < NI && REF(k) -> k++ \
    :: k >= NI -> k = 0; break \
    od

/* the smallest instance id nobody refers to: a fresh inode */
#define ALLOC(k) \
    k = 1; \
    do \
    :: k < NI && REF(k) -> k++ \
    :: k < NI && !REF(k) -> break \
    :: k >= NI -> assert(false) /* pool too small */ \
    od

/* Crash: dead for good.  Its instance keeps its records; an instance it made
   without writing owner.json, and a claim it held, age past their grace. */
#define CRASH_NOW \
    ncrash++; dead[me] = true; holding[me] = false; mylease[me] = false; \
    if :: own[me] != 0 && !irec[own[me]] -> iold[own[me]] = true :: else -> skip fi; \
    if :: c != 0 -> iclold[c] = true :: else -> skip fi; \
    own[me] = 0; insp[me] = 0; c = 0; r = false; GC; \
    goto end_dead

/* extra branches for an `if` inside an atomic step */
#define OR_CRASH :: ncrash < MAXCRASH -> CRASH_NOW

#ifdef CRASH_IN_CLAIM
#define OR_CRASH_CLAIMED OR_CRASH
#else
#define OR_CRASH_CLAIMED
#endif

/* CLAIMED(k): a claim in instance k that the protocol respects;
   CLAIMABLE(k): mkdir(L/claim) (or one level deeper) can succeed on k */
#if defined(CLAIM_TAKEOVER)
/* the claimer stalls past the claim grace period */
#define OR_STALL_CLAIMED :: CANPAUSE -> TICK; iclold[c] = true
#define CLAIMED(k)       (iclaim[k] != 0)
#define CLAIMABLE(k)     (iclaim[k] == 0 || iclold[k])
#elif defined(CLAIM_TAKEOVER_DEAD)
/* the claim names its maker; only a claim whose maker is provably dead is
   ignored and taken over */
#define OR_STALL_CLAIMED
#define LIVE_CLAIM(k)    (((iclaim[k] & 1) != 0 && !dead[0]) || \
                          ((iclaim[k] & 2) != 0 && !dead[1]) || \
                          ((iclaim[k] & 4) != 0 && !dead[2]))
#define CLAIMED(k)       LIVE_CLAIM(k)
#define CLAIMABLE(k)     (!LIVE_CLAIM(k))
#else
#define OR_STALL_CLAIMED
#define CLAIMED(k)       (iclaim[k] != 0)
#define CLAIMABLE(k)     (iclaim[k] == 0)
#endif
#define TAKE_CLAIM(k)    iclaim[k] = iclaim[k] | (1 << me); iclold[k] = false; c = k
/* rmdir of our own claim; claims left above it (taken over) are old ones */
#define DROP_CLAIM(k)    iclaim[k] = iclaim[k] & ~(1 << me); iclold[k] = (iclaim[k] != 0)

/* the holder stops refreshing long enough for its lease to run out */
#define EXPIRE_NOW   TICK; mylease[me] = false; ilive[own[me]] = false
#define OR_EXPIRE    :: CANPAUSE -> EXPIRE_NOW

/* forget everything about the current attempt and start again at A1 */
#define RETRY   own[me] = 0; insp[me] = 0; c = 0; r = false; GC; goto A1

/* end of a session (released, or found lost): we stop refreshing, so a
   record we leave behind lapses in due time */
#define SESSION_END \
    compromised[me] = false; \
    if :: own[me] != 0 -> ilive[own[me]] = false :: else -> skip fi; \
    RETRY

/* the pre-commit check: L is our instance, no claim in it, lease not run out */
#define PRECHECK_OK (holding[me] && L == own[me] && !CLAIMED(own[me]) && mylease[me])

proctype P(byte me)
{
    byte k;             /* scratch, always 0 between steps */
    byte c;             /* instance on which this process holds a claim */
    bool r;             /* owner.json present at inspection (the token r) */

    /* ---------------- acquire ---------------- */
    /* A1: mkdir(L).  On EEXIST, A2: inspect the instance at L (through one
       open fd, so inode and record agree).  Young without a record, or a live
       holder with a live lease: the step blocks (wait, retry). */
A1: atomic {
        if
        :: L == 0 ->                                    /* mkdir(L) succeeds */
            ALLOC(k);
            ipid[k] = me; irec[k] = false; ilive[k] = false;
            iold[k] = false; iclaim[k] = 0; iclold[k] = false;
            L = k; own[me] = k; k = 0;
            if
            :: skip
            :: CANPAUSE -> TICK; iold[own[me]] = true   /* stalled past the creation grace */
            OR_CRASH
            fi
        :: L != 0 && STALE(L) ->                        /* EEXIST, stale: break it */
            insp[me] = L; r = irec[L]; goto BREAK
        fi
    }
    /* write owner.json through the directory fd: into OUR instance, wherever it is */
    atomic {
        irec[own[me]] = true; ilive[own[me]] = true;
        if
        :: skip
        OR_EXPIRE
        OR_CRASH
        fi
    }
    /* check that L is still our instance (and, unless ACQ_INODE_ONLY, unclaimed) */
    atomic {
        if
        :: L != own[me] -> ilive[own[me]] = false; RETRY      /* moved away */
#ifdef ACQ_INODE_ONLY
        :: L == own[me] -> holding[me] = true; mylease[me] = ilive[own[me]]
#else
        :: L == own[me] && !CLAIMED(own[me]) ->
            holding[me] = true; mylease[me] = ilive[own[me]]
        /* L == own, claim present: blocks until the claimer has decided */
#endif
        fi
    }
    goto HOLD;

BREAK:
#ifdef BROKEN_RMDIR
    /* naive: remove whatever directory is at L now, then mkdir again */
    atomic { L = 0; RETRY }
#else
    /* B1: mkdir(L/claim) -- on whatever instance is at L now */
    atomic {
        if
        :: L == 0 -> RETRY                              /* ENOENT */
        :: L != 0 && !CLAIMABLE(L) -> RETRY             /* EEXIST */
        :: L != 0 && CLAIMABLE(L) -> TAKE_CLAIM(L);
            if
            :: skip
            OR_CRASH_CLAIMED
            OR_STALL_CLAIMED
            fi
        fi
    }
    /* B2: re-inspect: same inode, same token, still stale?  (No PINNED check
       here: a live holder may have moved its own instance aside, claim and
       all, by a release without a claim; the claim is undone through the
       instance's fd, wherever it is now.) */
    atomic {
        if
        :: L == insp[me] && irec[L] == r && STALE(L) ->
            PINNED(c);
            if
            :: skip
            OR_CRASH_CLAIMED
            OR_STALL_CLAIMED
            fi
        :: else -> DROP_CLAIM(c); RETRY                 /* undo: unlink(claim) via the fd */
        fi
    }
    /* B3: rename(L, L.<random>) -- whatever is at L -- then delete it aside */
    atomic { PINNED(c); L = 0; RETRY }
#endif

    /* ---------------- hold ---------------- */
HOLD:
    do
    :: /* heartbeat: rewrite owner.json in our own instance (dir fd) */
#ifdef HB_CHECK_BEFORE_WRITE
        atomic {
            if
            :: L == own[me] -> skip
            :: L != own[me] ->  /* lost: the next commit raises, the block exits */
                holding[me] = false; mylease[me] = false; compromised[me] = true;
                goto RELEASE
            fi
        }
        atomic { ilive[own[me]] = true; mylease[me] = true }
#else
        atomic {
            ilive[own[me]] = true;
            if
            :: skip
            OR_EXPIRE
            fi
        }
        /* ... then check that it is still ours before trusting the new expiry */
        atomic {
            if
            :: L == own[me] && !CLAIMED(own[me]) -> mylease[me] = ilive[own[me]]
            :: L == own[me] && CLAIMED(own[me]) -> skip   /* keep the old expiry */
            :: L != own[me] ->  /* lost: the next commit raises, the block exits */
                holding[me] = false; mylease[me] = false; compromised[me] = true;
                goto RELEASE
            fi
        }
#endif
    :: atomic { CANPAUSE -> EXPIRE_NOW }
    :: atomic { ncrash < MAXCRASH -> CRASH_NOW }
    :: /* commit, after the pre-commit check */
        atomic {
            /* (no `else` in this `if`: in the first statement of a do option
               SPIN reads `else` as "no other option of the do can run") */
            if
            :: PRECHECK_OK -> skip
#ifdef PRECOMMIT_WAITS
            /* a claim in our live instance: wait until its claimer has decided */
            :: !(holding[me] && L == own[me] && mylease[me]) ->
#else
            :: !PRECHECK_OK ->
#endif
#ifdef CHECK_REFUSALS
                CHECK(valid_holder_refused, holding[me] && L == own[me] && mylease[me]);
#endif
                compromised[me] = true; goto RELEASE    /* LockCompromisedError */
            fi;
#ifdef SUSPEND_AFTER_CHECK
            /* the holder may stall between the check and the rename */
            if
            :: skip
            OR_EXPIRE
            fi
        }
        atomic {
#endif
            /* the commit: rename(tmp, state file) */
            CHECK(commit_after_lost, compromised[me]);             /* property 2 */
            CHECK(stale_commit, !mylease[me] && OTHER_LIVE(me))    /* property 5 */
        }
    :: goto RELEASE
    od;

    /* ---------------- release ---------------- */
RELEASE:
    /* While our lease runs, nobody else may remove our instance, so the code
       releases without a claim (_release_fast): F1 reads the token at L, F2
       renames L aside.  Near the end of the lease it takes the claimed path
       (R1-R3).  Either may be chosen while the lease is live. */
    if
    :: atomic { holding[me] && mylease[me] ->
        holding[me] = false; mylease[me] = false;
        if
        :: L != own[me] -> SESSION_END                  /* F1: not ours: lost */
        :: L == own[me] ->
#ifdef SUSPEND_IN_RELEASE
            /* the releaser may stall between its token check and its rename */
            if
            :: skip
            :: CANPAUSE -> TICK; ilive[own[me]] = false
            fi
#else
            skip
#endif
        fi
       }
        /* F2: rename(L, aside) -- whatever is at L -- then delete it aside */
        atomic { CHECK(release_moved_other, L != own[me]); L = 0; SESSION_END }
    :: skip
    fi;
    /* R1: mkdir(L/claim) -- on whatever instance is at L */
    atomic {
        holding[me] = false; mylease[me] = false;
        if
        :: L == 0 || !CLAIMABLE(L) -> SESSION_END       /* lost (or being broken) */
        :: L != 0 && CLAIMABLE(L) -> TAKE_CLAIM(L);
            if
            :: skip
            OR_CRASH_CLAIMED
            OR_STALL_CLAIMED
            fi
        fi
    }
    /* R2: is it ours (token, inode)?  If not, the claim landed in another
       process's instance, which that process may since have moved aside by a
       release without a claim: undo it where it was made. */
    atomic {
        if
        :: L == own[me] ->
            PINNED(c);
            if
            :: skip
            OR_CRASH_CLAIMED
            OR_STALL_CLAIMED
            fi
        :: else -> DROP_CLAIM(c); SESSION_END           /* undo: lost */
        fi
    }
    /* R3: rename(L, aside) -- whatever is at L -- then delete it */
    atomic { PINNED(c); L = 0; SESSION_END }

end_dead:
    skip
}

#ifndef LIVENESS
/* property 1: never two processes that both believe they hold the lock
   while both their leases are live */
active proctype mutual_exclusion()
{
end_watch:
    atomic { !MUTEX -> CHECK(mutual_exclusion_broken, true) }
}
#endif

init {
    atomic { run P(0); run P(1); run P(2) }
}

#ifdef LIVENESS
/* property 3: a dead holder's lock is eventually taken by a live process */
#define dead_at_L (L != 0 && dead[ipid[L]])
#define taken     (LIVEHOLD(0) || LIVEHOLD(1) || LIVEHOLD(2))
ltl dead_lock_taken { [] (dead_at_L -> <> taken) }
#endif
