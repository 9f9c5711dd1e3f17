"""Steps that Ctrl-C (or SIGTERM) must not cut in two: renaming a finished output into place,
removing a temporary one.

Python runs its signal handlers in the main thread, between two bytecodes, whichever thread of
the process the operating system delivered the signal to (numba and the BLAS run threads of their
own). So blocking a signal in the main thread (pthread_sigmask) does not hold it back: another
thread takes it, and the KeyboardInterrupt still lands in the middle of the step. What does hold
it back is the Python-level handler itself: held_signals() swaps in one that only notes the
signal, and raises each signal noted again when the step is over. SIGALRM is held too: the
command line delivers with it a Ctrl-C it had to hold elsewhere (cli.Interrupts).
"""

import contextlib
import signal
import threading

HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)


@contextlib.contextmanager
def held_signals():
    """Run the block with Ctrl-C, SIGTERM and SIGALRM held; each signal that arrived meanwhile is
    raised again as the block ends (its usual handler then runs: Ctrl-C raises KeyboardInterrupt
    there).

    Only the main thread can change signal handlers; elsewhere the block runs unguarded (no
    handler of minigemma's would run in that thread anyway). A signal whose handler was set
    outside Python (getsignal gives None) is not held: Python could not put that handler back.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted = []
    previous = {signum: signal.signal(signum, lambda signum, frame: noted.append(signum))
                for signum in HELD if signal.getsignal(signum) is not None}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(noted):  # each once, in the order they came
            signal.raise_signal(signum)
