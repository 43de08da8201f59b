"""Run a job so that it stops with whoever started it: `python runtime/guard.py CMD ARGS...`.

runtime.launch.run_logged starts every job of the demo and the ablation grid through this process. The
`deepspeed` runner does not pass a signal on in local (one-node) mode: killed (by a SIGTERM, SIGINT or SIGKILL
of the harness, which PR_SET_PDEATHSIG turns into a SIGTERM of the runner), it dies alone, and its launcher
and ranks trained on, orphaned, holding the cores, the port and the run folder's lock. The guard instead:
- is the job's subreaper (PR_SET_CHILD_SUBREAPER): a process of the job whose parent dies is re-parented here,
  so "the job" is every process below the guard, found and reaped without polling;
- on SIGTERM or SIGHUP (its parent's death included: runtime.launch sets PR_SET_PDEATHSIG before the exec)
  sends SIGTERM to every process of the job, as a scheduler's stop does (the trainers save at the end of their
  step and exit; their DataLoader workers ignore a SIGTERM not sent by their rank: runtime.run), and SIGKILL
  to whatever is left STOP_GRACE_S later;
- ignores SIGINT: a terminal's Ctrl-C reaches the job's own processes, which stop as they always did;
- leaves a signal ignored when it was started with it ignored (nohup's SIGHUP), for the job too;
- once the command's own process has exited, stops what it left behind the same way (a crashed runner's ranks);
- exits as the command did (its exit code, or killed by the same signal), after every process of the job.
Linux only (elsewhere it runs the command as it is); the standard library alone, so any python3 runs it.
launch/deepspeed_env.sh runs the deepspeed launcher under it too on one node (and per node with NODE_RANK).
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
        except ProcessLookupError:  # exited meanwhile
            pass
    return pids


def _say(msg: str) -> None:
    try:
        print(f"runtime.guard: {msg}", file=sys.stderr, flush=True)
    except OSError:  # a closed output must not stop the guard (it runs in its signal handlers)
        pass


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit("usage: python runtime/guard.py CMD [ARGS...]")
    if not sys.platform.startswith("linux"):  # no subreaper, no /proc: run the command as it is
        os.execvp(argv[0], argv)
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
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
    # launch/slurm_node.sh's SIGTERM (it signals the job's whole process group itself)
    ignored = {s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) == signal.SIG_IGN}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for s in {signal.SIGTERM, signal.SIGHUP} - ignored:
        signal.signal(s, lambda signum, frame: stop(f"received {signal.Signals(signum).name}"))
    restore_sigint = signal.SIGINT not in ignored  # Ctrl-C must still reach the job
    try:
        leader = subprocess.Popen(argv, preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
                                  if restore_sigint else None)
    except OSError as e:
        raise SystemExit(f"runtime.guard: cannot start {argv[0]!r}: {e}") from None
    if stopping:  # asked to stop while it started
        _signal_job(signal.SIGTERM)
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1, 0)  # the leader and every orphan re-parented here (the subreaper)
        except ChildProcessError:  # nothing left below the guard
            break
        if pid == leader.pid:
            code = leader.returncode = os.waitstatus_to_exitcode(status)
            if not stopping and _job():
                stop(f"{argv[0]} exited ({code}) and left processes behind")
    signal.alarm(0)
    if code is not None and code < 0:  # killed by a signal: end the same way, for the caller's returncode
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # these two have no handler to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return 1 if code is None else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
