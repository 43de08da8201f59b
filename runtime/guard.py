"""Run a job so that it stops with whoever started it: `python3 -I runtime/guard.py [--parent PID] CMD ARGS...`.

runtime.launch.run_logged starts every job of the demo and the ablation grid through this process, and
launch/deepspeed_env.sh the deepspeed launcher on one node (and per node with NODE_RANK). The `deepspeed` runner
passes no signal on in that mode: killed (by a SIGTERM, SIGINT or SIGKILL of the harness, or `kill PID` of a
launch script), it died alone, and its node launcher and ranks trained on, orphaned, holding the cores, the port
and the run folder's lock. The guard instead:
- is the job's subreaper (PR_SET_CHILD_SUBREAPER): a process of the job whose parent dies is re-parented here,
  so "the job" is every process below the guard, found (/proc) and reaped without polling;
- on SIGTERM, SIGHUP or SIGUSR1 sent to it, and when the `--parent` process dies (PR_SET_PDEATHSIG), sends
  SIGTERM to every process of the job, as a scheduler's stop does (the trainers save at the end of their step
  and exit 143; their DataLoader workers ignore a SIGTERM not sent by their rank: runtime.run), and SIGKILL to
  whatever is left STOP_GRACE_S later (deepspeed's node launcher already kills its ranks 30 s after a SIGTERM);
- passes a SIGINT sent to it alone on to the command (a terminal's Ctrl-C reaches the job's processes
  themselves, which stop as they always did);
- leaves a signal ignored when it was started with it ignored (nohup's SIGHUP; launch/slurm_node.sh's SIGTERM
  and SIGUSR1, which it sends to the whole process group itself), for the job too;
- once the command's own process has exited, stops what it left behind the same way (a crashed runner's ranks),
  and then does not report success: the deepspeed runner exits 0 when its node launcher was killed;
- exits as the command did (its exit code, or killed by the same signal; 128 + N for a core-dumping one), after
  every process of the job.
Linux only (elsewhere it runs the command as it is); the standard library of Python 3.9+ alone. Run it with -I, so
that nothing in runtime/ shadows a standard module.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

STOP_GRACE_S = 60
"""Seconds from a stop's SIGTERM to the SIGKILL of what is left: the deepspeed launcher itself kills its ranks 30 s
after passing a SIGTERM on, and a scheduler's default (SLURM KillWait) is 30 s as well."""
PR_SET_CHILD_SUBREAPER = 36


def _job() -> list[int]:
    """The pids of every live process below the guard, the re-parented orphans included; not the exited ones that
    wait to be reaped (zombies). From /proc, so that the guard needs only the standard library (the launch
    scripts start it with whichever python3 is on PATH)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
                    state, ppid = f.read().rpartition(")")[2].split()[:2]
            except (OSError, ValueError):  # exited meanwhile
                continue
            if state != "Z":
                parent[int(d)] = int(ppid)
    below, todo = [], [os.getpid()]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        below += kids
        todo += kids
    return below


def _signal_job(sig: int) -> list[int]:
    """Send `sig` to every process of the job -> their pids."""
    pids = []
    for pid in _job():
        try:
            os.kill(pid, sig)
            pids.append(pid)
        except OSError:  # exited meanwhile (or not ours to signal): the guard must not fail in a signal handler
            pass
    return pids


def _say(msg: str) -> None:
    try:
        print(f"runtime.guard: {msg}", file=sys.stderr, flush=True)
    except OSError:  # a closed output must not stop the guard (it runs in its signal handlers)
        pass


CORE_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGQUIT,
                signal.SIGSYS, signal.SIGTRAP, signal.SIGXCPU, signal.SIGXFSZ}
"""Signals whose default action dumps core: a job killed by one exits 128 + N here rather than the guard dumping."""


def main(argv: list[str]) -> int:
    parent = None
    if argv[:1] == ["--parent"]:  # runtime.launch: stop when that process dies
        parent, argv = int(argv[1]), argv[2:]
    if not argv:
        raise SystemExit("usage: python3 -I runtime/guard.py [--parent PID] CMD [ARGS...]")
    if not sys.platform.startswith("linux"):  # no subreaper, no /proc: run the command as it is
        os.execvp(argv[0], argv)
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    stopping = False

    def kill_rest(signum, frame) -> None:
        if pids := _signal_job(signal.SIGKILL):
            _say(f"processes {pids} were still running {STOP_GRACE_S} s after the stop: killed")

    def stop(why: str) -> None:
        nonlocal stopping
        if stopping:  # one stop: a repeat is no request to hurry (runtime.run.StopSignals)
            return
        stopping = True
        if pids := _signal_job(signal.SIGTERM):
            _say(f"{why}: SIGTERM sent to the job's processes {pids}")
        signal.signal(signal.SIGALRM, kill_rest)
        signal.alarm(STOP_GRACE_S)

    # A signal ignored by whoever started the guard stays ignored, for the job too: nohup's SIGHUP, and
    # launch/slurm_node.sh's SIGTERM and SIGUSR1 (it signals the job's whole process group itself)
    ignored = {s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
               if signal.getsignal(s) == signal.SIG_IGN}
    leader = None

    def interrupt(signum, frame) -> None:
        # Ctrl-C reaches the job's own processes too; a SIGINT sent to the guard alone (`kill -INT PID`) goes to
        # the command, whose exit then stops what it leaves behind (the deepspeed runner's ranks)
        if leader is not None and leader.returncode is None:
            try:
                os.kill(leader.pid, signal.SIGINT)
            except OSError:
                pass

    signal.signal(signal.SIGINT, interrupt if signal.SIGINT not in ignored else signal.SIG_IGN)
    for s in {signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1} - ignored:  # SIGUSR1: a trainer's stop signal too
        signal.signal(s, lambda signum, frame: stop(f"received {signal.Signals(signum).name}"))
    if parent is not None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: set here, not in the (threaded) parent before the exec
        if os.getppid() != parent:  # it died before that
            return 128 + signal.SIGTERM
    try:
        leader = subprocess.Popen(argv)  # the handlers are reset by the exec; ignored signals stay ignored
    except OSError as e:
        raise SystemExit(f"runtime.guard: cannot start {argv[0]!r}: {e}") from None
    if stopping:  # asked to stop while it started
        _signal_job(signal.SIGTERM)
    code, left_behind, left_codes = None, False, []
    while True:
        try:
            pid, status = os.waitpid(-1, 0)  # the leader and every orphan re-parented here (the subreaper)
        except ChildProcessError:  # nothing left below the guard
            break
        if pid == leader.pid:
            code = leader.returncode = os.waitstatus_to_exitcode(status)
            if not stopping and _job():
                left_behind = True
                stop(f"{argv[0]} exited ({code}) and left processes behind")
        elif left_behind:
            left_codes.append(os.waitstatus_to_exitcode(status))
    signal.alarm(0)
    if code == 0 and (failed := [c for c in left_codes if c not in (0, -signal.SIGTERM)]):
        # the deepspeed runner exits 0 when its node launcher was killed: the ranks it left behind, stopped here
        # (a trainer exits 143), say the job did not complete
        _say(f"{argv[0]} exited 0 but left processes running, which exited {failed}: the job did not complete")
        code = failed[0]
    if code is not None and code < 0:  # killed by a signal: end the same way, for the caller's returncode
        if -code in CORE_SIGNALS:
            return 128 - code  # no core file of the guard
        if -code != signal.SIGKILL:  # it has no handler to reset (an out-of-memory kill reads as -9 above too)
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return 1 if code is None else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
