"""How a run can end other than well: a user's mistake (``UserError``, exit status 2), an interruption, a diverged
loss, a full disk, a lost process of a data-parallel run."""

from __future__ import annotations

import signal


class UserError(Exception):
    """A mistake the user can fix; the scripts print its message on one line and exit with status 2."""


class RunInterrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (a job scheduler) arrived. A BaseException, so no ``except Exception`` swallows it.

    On its way up, the code that knows fills in what is kept (``saved``) and, where the flags that continue
    differ from the run's own plus --resume, the command that continues (``continue_command``).
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.saved: str | None = None
        self.continue_command: str | None = None


class TrainingDiverged(Exception):
    """The loss became NaN, infinite or exploded: later epochs cannot rescue the run."""

    def __init__(self, loss_name: str, value: float, epoch: int, lr: float):
        super().__init__(
            f"training diverged: the {loss_name} is {value:.3g} after epoch {epoch}; lower the learning rate "
            f"(--lr, now {lr:g}) and start again; no model.pth was written"
            + (", last.ckpt keeps the last good epoch" if epoch > 1 else "")
        )
        self.loss_name, self.value, self.epoch = loss_name, value, epoch


class DiskFull(Exception):
    """The disk filled up during a run. ``resumable``: a checkpoint was written before, so --resume continues the run;
    without one, the same command starts it again."""

    def __init__(self, path: str, resumable: bool):
        super().__init__(path)
        self.path, self.resumable = path, resumable


class ProcessLost(Exception):
    """A data-parallel run lost one of its processes: an exchange between them (gradients, metrics, a barrier, their
    first connection) failed, or waited ``seconds`` (--collective-timeout) without an answer. ``what`` is PyTorch's
    reason in a few words; on its way up, ``saved`` is filled in with what last.ckpt holds (None: nothing to
    continue)."""

    def __init__(self, what: str, timed_out: bool, seconds: float, nodes: int):
        one = "a node" if nodes > 1 else "a process"
        super().__init__(
            f"another process of this data-parallel run did not answer for {seconds:g} s (--collective-timeout): "
            f"{one} froze, never started, or is that much slower than this one ({what})"
            if timed_out
            else f"this data-parallel run lost one of its processes: {one} stopped, or the network between them "
            f"failed ({what})"
        )
        self.nodes = nodes
        self.saved: str | None = None
