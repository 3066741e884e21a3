"""The end of a multi-process run: every process waits for the others, ends its process groups, then leaves
without the interpreter's finalisation.

Why a launched process that finished its work does not simply return (see :func:`exit_process`):
``torch.distributed.destroy_process_group()`` only unregisters a group. The C++ ``ProcessGroupGloo`` lives
on while anything still holds it (FSDP2 keeps it in ``FSDPMeshInfo.shard_process_group`` of every sharded
module, DeepSpeed and device meshes keep theirs), and with it its worker threads (``pt_gloo_runloop``) and
its transport thread (``gloo_tcp_loop``). A worker thread releases a finished collective only after it has
woken the waiting process, so on a busy machine it may still be doing so when the main thread reaches the
end of the program. If that release (or a completion hook) needs the GIL after the interpreter has begun to
finalise, CPython ends the thread with ``pthread_exit``, whose forced unwinding through C++ ``noexcept``
frames calls ``std::terminate``: "terminate called without an active exception", the process is killed by
SIGABRT (exit code -6) although its run was complete and saved.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Iterable


def native_threads() -> list[str]:
    """The names of this process's OS threads (Linux ``/proc/self/task``; ``[]`` elsewhere): C++ threads such
    as gloo's ``pt_gloo_runloop`` / ``gloo_tcp_loop`` included, which ``threading.enumerate()`` does not list."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(names)


def end_process_group(accelerator=None) -> bool:
    """Wait for every process, then destroy every process group of ``torch.distributed`` (the default group
    and its sub-groups); with an ``accelerator``, through ``Accelerator.end_training()`` (its trackers
    finish too). Returns whether a group was ended. Call it on the success path only: after a failure on
    one process, the others may be inside a collective and the barrier would wait for them forever."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if accelerator is not None:
            accelerator.end_training()
        return False
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()
    else:
        dist.barrier()
    if dist.is_initialized():  # end_training leaves a group that accelerate did not start
        dist.destroy_process_group()
    return True


def _fsync(paths: Iterable[str | os.PathLike]) -> None:
    for path in paths:
        path = os.fspath(path)
        files = [path] if os.path.isfile(path) else []
        if os.path.isdir(path):  # the folder's own files (a saved model), not its checkpoints
            files = [os.path.join(path, n) for n in sorted(os.listdir(path))]
        for name in files:
            if os.path.isfile(name):
                fd = os.open(name, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def exit_process(code: int = 0, fsync: Iterable[str | os.PathLike] = ()) -> None:
    """End this process now with exit code ``code``, after what a normal exit does while the interpreter is
    still whole, and without what follows it.

    Done first, as at a normal exit: non-daemon Python threads are joined, then the ``atexit`` handlers run
    (logging's flush, trackers, temporary files, ...). Then the files and folders in ``fsync`` are synced to
    disk and stdout/stderr flushed. Skipped: the interpreter's finalisation (module teardown, the last
    garbage collection, C++ static destructors).

    Why (the module docstring has the details): after ``destroy_process_group()`` the gloo threads of a
    group that FSDP2 / DeepSpeed still hold are alive, and they cannot be joined from Python: only the C++
    group's destructor joins them, and it runs only once the last reference from the sharded model goes,
    which a caller (or the interpreter's finalisation itself) decides. A gloo thread that needs the GIL
    during finalisation aborts the finished process (SIGABRT, "terminate called without an active
    exception"). ``os._exit`` ends every thread at once, with no finalisation, so the exit code is the
    run's. Only for a process that has completely finished and saved its work: a launched worker of a
    multi-process run."""
    main = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main and thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    try:
        atexit._run_exitfuncs()
    finally:
        try:
            _fsync(fsync)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (AttributeError, OSError, ValueError):  # closed or replaced streams
                    pass
            os._exit(code)
