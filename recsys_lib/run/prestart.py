"""Kernels started early: while a notebook runs, the pipeline starts the next one's kernel on a
background thread, with the heavy third-party modules every notebook loads imported
(`PRELOAD`; never ``recsys_lib``) and exactly the environment and working directory its own start
would have had, so the notebook begins on a ready kernel (`Prestart`). Results are unchanged; a
notebook's wall seconds no longer include its kernel's start when that was ready in time.
``RECSYS_PRESTART=0`` turns it off (`prestart_enabled`). Only the pipeline imports this module: no
notebook's kernel loads it, so changing it makes no completion record stale."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from .. import config
from . import state as runstate


def _first_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


PRESTART_ENV = "RECSYS_PRESTART"
#: the heavy third-party modules every notebook's kernel imports anyway (each notebook loads
#: `run.notebook`, hence `run.experiment`), in the order that import loads them. Never a
#: ``recsys_lib`` module: a kernel notes the library modules it loaded (`run.tracking`), and its
#: record must name only those its notebook loaded.
PRELOAD = ("numpy", "pandas", "pyarrow", "torch", "scipy.sparse")
#: seconds a kernel started early may take to answer once launched (it shares the cores with a
#: running notebook); past that it is shut down and its notebook starts a kernel as usual
PRESTART_TIMEOUT = 300


def prestart_enabled() -> bool:
    """Whether kernels start early (`Prestart`): unless ``$RECSYS_PRESTART`` is ``0`` (or
    ``false``, ``no``, ``off``)."""
    return os.environ.get(PRESTART_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def preload_line(modules: tuple[str, ...] = PRELOAD) -> str:
    """The kernel's ``exec_lines``: imports ``modules`` and leaves no name in the user namespace.
    IPython runs it with ``store_history=False``, so the notebook's execution counts start at 1 as
    usual, and before the kernel answers its first request."""
    names = ", ".join(repr(m) for m in modules)
    return (f"import importlib as __recsys_prestart; [__recsys_prestart.import_module(m) for m in ({names})]; "
            f"del __recsys_prestart")


@lru_cache(maxsize=None)
def _manager_class():
    """jupyter_client's AsyncKernelManager, which also reports its kernel's pid the moment it is
    launched (for `Usage`'s exclusion) and keeps the clients it made: nbclient leaves its client
    open on a manager it does not own, and `_shutdown` closes it."""
    from jupyter_client import AsyncKernelManager

    class PrestartManager(AsyncKernelManager):
        def __init__(self, *args, on_launch=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.on_launch = on_launch
            self.clients: list = []

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            await super()._async_launch_kernel(kernel_cmd, **kw)
            if self.on_launch is not None and self.provisioner is not None:
                self.on_launch(self.provisioner.pid)

        def client(self, **kwargs):
            kc = super().client(**kwargs)
            self.clients.append(kc)
            return kc

    return PrestartManager


def _run_async(coro):
    """Run ``coro`` on an event loop of its own, then close that loop (a `Prestart`'s thread)."""
    import asyncio
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _shutdown(km, now: bool = False) -> None:
    """Shut down a kernel the pipeline started as nbclient shuts down one it owns (graceful:
    a shutdown request, then SIGTERM, then SIGKILL; ``now``: SIGKILL), on the same event loop
    (jupyter_core's ``run_sync``: this thread's, where nbclient made its client), close the
    clients made for it, and in every case leave its process killed and reaped."""
    from jupyter_core.utils import run_sync
    proc = getattr(km.provisioner, "process", None) if km.provisioner is not None else None

    async def stop():
        try:
            if await km.is_alive():
                await km.shutdown_kernel(now=now)
        except RuntimeError as exc:
            if "No kernel is running!" not in str(exc):
                raise
        finally:
            await km.cleanup_resources()
            for kc in km.clients:
                kc.stop_channels()
            km.clients.clear()

    try:
        run_sync(stop)()
    except Exception:  # noqa: BLE001 - the process is dealt with below, whatever went wrong
        pass
    finally:
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(30)


class Prestart:
    """A notebook's kernel, started on a background thread while the notebook before it runs,
    with `PRELOAD` imported (``IPKernelApp.exec_lines``), so that the notebook starts on a kernel
    that is up and has done its slowest imports.

    The kernel gets what the kernel nbclient would start for its notebook gets: the ``recsys``
    kernel spec, the notebooks folder as working directory, and the pipeline's environment with
    ``$RECSYS_NOTEBOOK`` naming its notebook (nothing of the notebook running meanwhile). Its
    stdout and stderr go to its notebook's log (first ``logs/.<notebook>.prestart.log``, renamed
    when the notebook starts; with ``--verbose``, the console). It starts once ``after`` (the
    kernel of the notebook before it) is up, so that it does not slow that kernel's start.

    `take` hands the ready manager to papermill (``km=``), or None, with a console line, when the
    start failed: the notebook then starts its kernel as usual. `close` shuts the kernel down and
    reaps it, used or not; it is safe to call again. nbclient does not shut down a manager it was
    given, so `execute` closes it after the notebook (inside the notebook's `Usage` block: the
    kernel's CPU, early imports included, counts in its own notebook) and `run_notebooks` closes
    one nobody will use. Should the pipeline itself be killed, ipykernel's parent poller
    (``JPY_PARENT_PID``) ends its kernels, as it ends those nbclient starts."""

    #: every Prestart not closed yet (`run_notebooks` closes them all, whatever stopped it)
    live: "set[Prestart]" = set()

    def __init__(self, nb: Path, kernel: str, run_dir: Path, verbose: bool = False,
                 after: "Prestart | None" = None, timeout: float = PRESTART_TIMEOUT):
        self.nb = nb
        self.kernel = kernel
        self.timeout = timeout
        self.env = {**os.environ, runstate.ENV_NOTEBOOK: nb.stem}    # taken here, in the main thread
        self.cwd = str(config.notebooks_dir())
        self.km = None
        self.error: BaseException | None = None
        self._pids: tuple[int, ...] = ()
        self._taken = False
        self._ready = threading.Event()
        self._cancel = threading.Event()
        self._after = after
        self.log: Path | None = None
        self._log_fh = None
        self._thread = threading.Thread(target=self._main, name=f"prestart-{nb.stem}", daemon=True)
        try:
            if not verbose:
                self.log = Path(run_dir) / "logs" / f".{nb.stem}.prestart.log"
                self.log.parent.mkdir(parents=True, exist_ok=True)
                self._log_fh = open(self.log, "wb")
            Prestart.live.add(self)
            self._thread.start()
        except BaseException:
            Prestart.live.discard(self)
            if self._log_fh is not None:
                self._log_fh.close()
            if self.log is not None:
                self.log.unlink(missing_ok=True)
            raise

    @classmethod
    def start(cls, nb: Path, kernel: str, run_dir: Path, console: Any,
              after: "Prestart | None" = None) -> "Prestart | None":
        """A `Prestart` under way, or None (after one console line) when even that failed."""
        try:
            return cls(nb, kernel, run_dir, console.verbose, after)
        except Exception as exc:  # noqa: BLE001 - never fail the run for an early start
            console.line(f"{nb.stem}: could not start its kernel early ({type(exc).__name__}: "
                         f"{_first_line(str(exc))}); it starts as usual")
            return None

    def pids(self) -> tuple[int, ...]:
        """The kernel's pid once launched (for `usage.Usage`'s ``exclude``)."""
        return self._pids

    def _launched(self, pid: int) -> None:
        self._pids = (*self._pids, int(pid))

    def _main(self) -> None:
        try:
            after = self._after
            while after is not None and not after._ready.wait(0.2):
                if self._cancel.is_set():
                    raise RuntimeError("cancelled")
            self._after = None
            if self._cancel.is_set():
                raise RuntimeError("cancelled")
            _run_async(self._start())
        except BaseException as exc:  # noqa: BLE001 - reported by take()
            self.error = exc
        finally:
            if self._log_fh is not None:
                with contextlib.suppress(OSError):
                    self._log_fh.close()
            self._ready.set()

    async def _start(self) -> None:
        km = _manager_class()(kernel_name=self.kernel, on_launch=self._launched)
        args = [f"--IPKernelApp.exec_lines={preload_line()}"]
        if km.ipykernel:                                    # as nbclient does for a kernel it starts
            args.append("--HistoryManager.hist_file=:memory:")
        io = {"stdout": self._log_fh, "stderr": self._log_fh} if self._log_fh is not None else {}
        try:
            await km.start_kernel(cwd=self.cwd, env=self.env, extra_arguments=args, **io)
            kc = km.client()
            kc.start_channels()
            try:
                deadline = time.monotonic() + self.timeout
                while True:
                    if self._cancel.is_set():
                        raise RuntimeError("cancelled")
                    try:
                        await kc.wait_for_ready(timeout=1)
                        break
                    except RuntimeError:
                        if not await km.is_alive():
                            raise RuntimeError("the kernel died while starting") from None
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"the kernel did not answer in {self.timeout:.0f} s") from None
            finally:
                kc.stop_channels()
                km.clients.remove(kc)
                km._close_control_socket()       # made on this thread's loop; reopened when needed
        except BaseException:
            with contextlib.suppress(BaseException):
                await km.shutdown_kernel(now=True)
            proc = getattr(km.provisioner, "process", None) if km.provisioner is not None else None
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()
                proc.wait(30)
            raise
        self.km = km

    def claim_log(self, log: Path) -> None:
        """Rename the kernel's log to ``log`` (the notebook's; the kernel keeps writing to it)."""
        if self.log is not None:
            with contextlib.suppress(OSError):
                os.replace(self.log, log)
            self.log = None

    def take(self, console: Any):
        """Wait until the kernel is up, and hand over its manager; None when it failed."""
        while not self._ready.wait(0.5):
            pass
        if self.km is None:
            why = self.error if self.error is not None else "no kernel"
            text = (f"{self.nb.stem}: its kernel, started early, failed ({type(why).__name__}: "
                    f"{_first_line(str(why))}); it starts as usual")
            console.line(text)
            if not console.verbose:                         # and in the notebook's log (fd 2, now)
                with contextlib.suppress(OSError):
                    os.write(2, f"[pipeline] {text}\n".encode())
            return None
        self._taken = True
        return self.km

    def close(self, now: bool = False) -> None:
        """Shut the kernel down and reap it (``now``, or when it was never used: at once)."""
        self._cancel.set()
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join()
        km = self.km
        if km is not None:
            _shutdown(km, now=now or not self._taken)
            self.km = None
        if self.log is not None:
            self.log.unlink(missing_ok=True)
            self.log = None
        Prestart.live.discard(self)
