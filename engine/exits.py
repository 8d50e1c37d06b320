"""How a run ends: ``run_cli`` turns it into one line on stderr and an exit status (0 done; 1 diverged, a full disk or a
lost process of a data-parallel run; 2 the user's mistake; 130 Ctrl-C and 143 SIGTERM, with the command that
continues)."""

from __future__ import annotations

import errno
import shlex
import signal
import sys
from collections.abc import Callable
from typing import Any

from engine.devices import is_first_on_its_node, is_main_process
from engine.errors import DiskFull, ProcessLost, RunInterrupted, TrainingDiverged, UserError


def raise_interrupted(signum: int, frame) -> None:
    raise RunInterrupted(signum)


def restart_command(argv: list[str]) -> str:
    """The command line ``argv`` without --overwrite and --resume (and its checkpoint): starts the run in its folder
    again.
    """
    args, skip_value = [], False
    for arg in argv[1:]:
        if skip_value and not arg.startswith("-"):
            skip_value = False
            continue
        skip_value = arg == "--resume"
        if arg in ("--overwrite", "--resume") or arg.startswith("--resume="):
            continue
        args.append(arg)
    return shlex.join(["python", argv[0], *args])


def resume_command(argv: list[str]) -> str:
    """The command line that continues the run ``argv`` started: the same flags, without --overwrite, with --resume."""
    return f"{restart_command(argv)} --resume"


def way_on(resumable: bool) -> str:
    """The command that goes on after a run stopped: --resume where an epoch was saved, else the same command."""
    if resumable:
        return f"continue with: {resume_command(sys.argv)}"
    return f"start it again (no epoch was saved yet) with: {restart_command(sys.argv)}"


def interrupted_message(interrupt: RunInterrupted) -> str:
    """One line: which signal, what is kept, and the command that continues (only if there is something to continue)."""
    if interrupt.saved is None:
        return (
            f"interrupted by {interrupt} before anything was saved: nothing to resume; run the same command to "
            "start again"
        )
    command = resume_command(sys.argv) if interrupt.continue_command is None else interrupt.continue_command
    return f"interrupted by {interrupt}: {interrupt.saved}" + (f"; continue with: {command}" if command else "")


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's ``main`` with the toolkit's exit statuses, each with one line on stderr.

    0 done; 1 training diverged, the disk filled up or a data-parallel run lost a process; 2 a mistake in the command
    or the data (``UserError``); 130 Ctrl-C (SIGINT) and 143 SIGTERM, after saying what was saved and how to continue.
    """
    handlers = {signum: signal.signal(signum, raise_interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except DiskFull as full:
        print(
            f"error: the disk is full ({full.path}); the files written before stay as they were: free some "
            f"space, then {way_on(full.resumable)}",
            file=sys.stderr,
        )
        sys.exit(1)
    except ProcessLost as lost:
        if is_first_on_its_node():  # every node's log gets the line: the one that failed may be any of them
            kept = f"{lost.saved}; " if lost.saved else ""
            everywhere = "on every node, " if lost.nodes > 1 else ""
            print(f"error: {lost}; {kept}{everywhere}{way_on(lost.saved is not None)}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(
            f"error: the disk is full ({error.filename or error}); the files written before stay as they were: free "
            "some space, then run the same command again",
            file=sys.stderr,
        )
        sys.exit(1)
    except (RunInterrupted, KeyboardInterrupt) as interrupt:
        if not isinstance(interrupt, RunInterrupted):
            interrupt = RunInterrupted(signal.SIGINT)
        if is_main_process():
            print(f"\n{interrupted_message(interrupt)}", file=sys.stderr)
        sys.exit(128 + interrupt.signum)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
