"""Connecting a job to Ray: the cluster in RAY_ADDRESS, or a fresh local one, and a quiet console.

`ray.init()` with no address silently attaches to whatever `ray start` cluster it finds on the
machine; a job run on a laptop must instead start its own (the embedded default), so the address
is always spelled out. Under `ray job submit` RAY_ADDRESS is set by Ray itself.

The console belongs to the person who started the job: progress and results. Ray, Ray Data and
Ray Train talk a lot, and unless `verbose` their talk goes to log files in the Ray session's
`logs/` folder (`ray logs`, the dashboard, or the folder itself), set up here when the job starts
or joins Ray; everything below is job-level, so it works the same on a cluster the job cannot
reconfigure:
- workers' stdout and stderr: `log_to_driver=False`, so they stay in each worker's own log file.
  Lines a worker means for the person go through `console.Relay` instead.
- Ray Data on the driver: its progress bars and execution banners off (DataContext, which every
  dataset created afterwards carries into the workers that run it), and its console handler
  removed from the `ray.data` logger (its own file, `ray-data.log`, keeps every record).
- Ray's Python loggers and warnings on the driver (the `ray` logger, e.g. the token-auth notice
  of every `ray.init`, and `warnings` raised inside Ray's packages), and the messages the cluster
  sends the job (the raylet's "N worker processes have been started", which a 2-core laptop
  running a pipeline of small processes always triggers): to `groupemotion-driver-<pid>.log`.
- the driver's C++ core writes its ERROR lines to the process's stderr as well as to its own log
  file (e.g. "has constructor arguments in the object store", once for the first actor Ray Data
  creates); the process's file descriptor 2 is pointed at `groupemotion-driver-<pid>.err`, while
  Python's `sys.stderr` keeps the terminal. So a crash of native code in the driver leaves its
  last words in that file, not on the console.
- Ray Train's placement-group cleaner polls Ray's state API every second to see if the train
  controller is alive, and warns when the API is not there, which it never is without a dashboard
  (the embedded Ray starts none: on one machine the whole Ray ends with the job, so there is
  nothing for the cleaner to clean). On the embedded Ray a worker setup hook sets that one
  logger to ERROR; on a cluster, whose dashboard answers, it stays as it is. The hook is given
  in Ray's own environment variable for it, which the raylet and so every worker inherit, not as
  the job's `runtime_env`: a job with a runtime_env gets each worker started through Ray's
  `setup_worker.py` (one more interpreter start, about half a CPU-second a worker) and cannot
  use the workers the raylet prestarts while the driver sets up.
A Ray started by someone else (a notebook, the test suite) keeps its own settings.

Public settings do most of this (`log_to_driver`, `configure_logging`, DataContext, the runtime
context's temp dir and session name for the log folder); `logging.lastResort` and file descriptor 2
are Python's and the OS's, not Ray's. Two things have no public setting in Ray 2.60 and reach
into `ray._private`: the error listener's `print_to_stdstream` (it prints the raylet's messages
whatever `log_to_driver` says) and the name of the environment variable the raylet passes the
worker setup hook in. pyproject.toml pins Ray to the minor release they were written for, and
tests/jobs/runtime/test_runtime.py fails, naming which one, when a Ray changes either.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_WORKER_SETUP_HOOK = "ray_jobs.runtime.session.quiet_worker"


def ensure_ray(num_cpus: int | None = None, *, min_cpus: int = 0, verbose: bool = False):
    """Connect to RAY_ADDRESS if set, otherwise start a local Ray bound to loopback.

    Unless `num_cpus` says exactly, the local Ray gets the machine's cores but never fewer than 4
    logical CPUs, nor fewer than `min_cpus` (what a job's stages hold at once): every job is a
    pipeline of stages that each hold a CPU (read tasks, decode actors, model actors or Ray Train
    workers), and with fewer CPUs than stages the last stage never gets one and the job waits.
    Without `verbose`, Ray's own output goes to log files (module docstring).
    """
    import ray

    if ray.is_initialized():
        return ray
    if verbose:
        _init(num_cpus, min_cpus, verbose=True)
        return ray
    log = _DriverLog()
    _route_python_logs(log)
    # ray.init empties the `ray` logger's handlers, and what Ray logs meanwhile would find no
    # handler but logging's last resort, stderr: for the time of ray.init, that is the log.
    last_resort, logging.lastResort = logging.lastResort, log
    try:
        _init(num_cpus, min_cpus, verbose=False)
    finally:
        logging.lastResort = last_resort
    logging.getLogger("ray").addHandler(log)
    log.open()
    _route_native_stderr(log.directory)
    _route_error_messages()
    _quiet_ray_data()
    return ray


def _init(num_cpus: int | None, min_cpus: int, *, verbose: bool) -> None:
    import ray

    address = os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, configure_logging=False, log_to_driver=verbose)
        return
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    saved = os.environ.get(WORKER_PROCESS_SETUP_HOOK_ENV_VAR)
    if not verbose:  # the raylet started below inherits it (module docstring)
        os.environ[WORKER_PROCESS_SETUP_HOOK_ENV_VAR] = _WORKER_SETUP_HOOK
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus or max(4, min_cpus, os.cpu_count() or 1),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
            log_to_driver=verbose,
        )
    finally:
        if saved is None:
            os.environ.pop(WORKER_PROCESS_SETUP_HOOK_ENV_VAR, None)
        else:
            os.environ[WORKER_PROCESS_SETUP_HOOK_ENV_VAR] = saved


def quiet_worker() -> None:
    """Worker setup hook of the embedded Ray (module docstring): the cleaner's warnings off."""
    logging.getLogger(_CLEANER_LOGGER).setLevel(logging.ERROR)


class _DriverLog(logging.Handler):
    """Log records -> `<Ray session>/logs/groupemotion-driver-<pid>.log`; records from before the
    session exists (ray.init's own) wait in memory until `open`."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s -- %(message)s"))
        self.directory: str | None = None
        self._file: logging.Handler | None = None
        self._early: list[logging.LogRecord] = []

    def open(self) -> None:
        import ray

        # The session's `logs/` folder, where Ray Data's own log file lives too.
        context = ray.get_runtime_context()
        self.directory = os.path.join(context.get_temp_dir(), context.get_session_name(), "logs")
        self._file = logging.FileHandler(os.path.join(self.directory, f"groupemotion-driver-{os.getpid()}.log"))
        self._file.setFormatter(self.formatter)
        for record in self._early:
            self._file.handle(record)
        self._early.clear()

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is not None:
            self._file.handle(record)
        elif len(self._early) < 1000:
            self._early.append(record)


def _route_python_logs(log: _DriverLog) -> None:
    import ray.data  # noqa: F401  (configures the ray.data logger on import; it must come first)

    root = logging.getLogger("ray")
    data = logging.getLogger("ray.data")
    for handler in list(data.handlers):
        if isinstance(handler, logging.StreamHandler):  # its file handler is not a stream handler
            data.removeHandler(handler)
    ray_dir = os.path.dirname(ray.__file__) + os.sep
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(ray_dir):
            root.warning("%s", warnings.formatwarning(message, category, filename, lineno, line).rstrip())
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def _route_native_stderr(directory: str) -> None:
    terminal = os.dup(2)
    target = os.open(os.path.join(directory, f"groupemotion-driver-{os.getpid()}.err"),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stderr.flush()
    os.dup2(target, 2)
    os.close(target)
    sys.stderr = open(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")


def _route_error_messages() -> None:
    """The driver's error listener prints what the cluster reports to the job (e.g. the raylet's
    "N PYTHON worker processes have been started", a worker that died) to stdout whatever
    log_to_driver says; it calls `ray._private.worker.print_to_stdstream` each time, so that name
    now logs to the driver log instead. (Ray's log forwarding, with --verbose, keeps the original:
    it bound it when Ray started.)"""
    from ray._private import worker

    logger = logging.getLogger("ray")

    def to_log(data: dict, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", ()):
            logger.warning("(%s) %s", data.get("pid", ""), line)

    worker.print_to_stdstream = to_log


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
