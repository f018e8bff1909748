"""The writer that ``test_crash.py`` kills (a script, not a test module).

Usage: ``python crash_writer.py DATA_DIR WRITERS``, then one PREFIX per line
on stdin.

For each PREFIX it forks a writer process that opens a replica on DATA_DIR
and runs WRITERS concurrent tasks putting keys ``PREFIX/<writer>/<n>``
(n = 0, 1, 2, ...) into scope ``site`` for ever. A writer prints each key on
its own line only after ``kv_put`` has returned, i.e. once the write is
acknowledged as durable. The test SIGKILLs the writer whenever it likes.

Protocol on stdout, besides the keys: ``pid <pid>`` once a writer is forked,
``dead <pid>`` once it has been reaped (its files are closed and its lock is
gone), and then the next PREFIX is read. Forking from this process, which has
imported everything already, makes a crash round cost milliseconds, not the
interpreter's start-up.
"""

from __future__ import annotations

import os
import sys

import trio

from konsul.sync.replica import Replica

SCOPE = "site"


def value_for(key: str) -> bytes:
    """A value the test can recompute; sizes vary so rounds differ in shape."""
    return (key + "|").encode() * (1 + sum(key.encode()) % 13)


def say(line: str) -> None:
    # Unbuffered: a line is in the pipe before anything else happens.
    os.write(1, f"{line}\n".encode())


async def write_forever(data_dir: str, prefix: str, writers: int) -> None:
    replica = Replica.open(data_dir, durability="full")
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.run)
        scope = replica.scope(SCOPE)

        async def writer(number: int) -> None:
            n = 0
            while True:
                key = f"{prefix}/{number:02d}/{n:06d}"
                await scope.kv_put(key, value_for(key))
                say(key)
                n += 1

        for number in range(writers):
            nursery.start_soon(writer, number)


def main(data_dir: str, writers: int) -> None:
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                trio.run(write_forever, data_dir, line.strip(), writers)
            finally:
                os._exit(1)  # only reached if the writer failed by itself
        say(f"pid {pid}")
        os.waitpid(pid, 0)
        say(f"dead {pid}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
