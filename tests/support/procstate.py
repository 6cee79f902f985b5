"""Whether a process waits or works, read from /proc without timing it.

A process parked on its watchers sleeps in the kernel whenever it is looked at, and wakes only when
something happens; one that spins is runnable whenever it is looked at; one that polls wakes up again and
again with nothing to do. CPU seconds tell the same story but depend on the machine's speed and load;
these two observations do not:

    watch = Watch(pid)            # from now on
    ...                           # the process is expected to wait; call watch.sample() now and then
    watch.asleep_share()          # share of samples in which no thread of the process was runnable
    watch.wakeups()               # waits that ended since Watch() (voluntary context switches)
"""

import glob


def _tasks(pid):
    return glob.glob("/proc/%d/task/*" % pid)


def wakeups(pid) -> int:
    """Voluntary context switches of all the process's threads so far: each is a wait that ended."""
    total = 0
    for task in _tasks(pid):
        try:
            with open(task + "/status") as handle:
                for line in handle:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            continue  # a thread that ended while we looked
    return total


def asleep(pid) -> bool:
    """True when no thread of the process is runnable (running or waiting for a CPU) right now."""
    for task in _tasks(pid):
        try:
            with open(task + "/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state == "R":
            return False
    return True


class Watch:
    def __init__(self, pid):
        self.pid = pid
        self.start = wakeups(pid)
        self.samples = []

    def sample(self) -> None:
        self.samples.append(asleep(self.pid))

    def asleep_share(self) -> float:
        assert self.samples, "no sample taken"
        return self.samples.count(True) / len(self.samples)

    def wakeups(self) -> int:
        return wakeups(self.pid) - self.start
