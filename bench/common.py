"""Shared pieces of the benchmarks: result records, the run profile, timing helpers, and processes.

Every figure is a ratio against a baseline measured in the same run (this machine is shared and noisy,
so absolute numbers mean little on their own); absolute values are kept beside the ratio. Every child
process a benchmark starts is registered here and killed at the end, also on error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from fedscaled.ctl.client import ControlClient

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- profile
@dataclass(frozen=True)
class Profile:
    """How big and how often: ``smoke`` (every benchmark once, tiniest), ``quick`` (minutes), ``full``."""

    name: str
    repeats: int  # best-of / median-of this many runs
    kernel_sizes: tuple[int, ...]
    kernel_n: int
    robust_k: tuple[int, ...]
    robust_sizes: tuple[int, ...]
    ingest_sizes: tuple[int, ...]
    ingest_concurrency: tuple[int, ...]
    ingest_uploads: int  # uploads per configuration (at least the concurrency)
    memory_participants: tuple[int, ...]
    memory_params: int
    checkin_devices: tuple[int, ...]
    checkin_connections: int
    checkin_seconds: float
    close_sizes: tuple[int, ...]
    close_rounds: int
    startup_repeats: int
    scale_devices: tuple[int, ...]  # fleet sizes of the scale curve (bench/scale.py)


PROFILES = {
    "smoke": Profile("smoke", repeats=1, kernel_sizes=(10_000,), kernel_n=4, robust_k=(5,), robust_sizes=(10_000,),
                     ingest_sizes=(10_000,), ingest_concurrency=(4,), ingest_uploads=4,
                     memory_participants=(2, 4), memory_params=10_000, checkin_devices=(20,),
                     checkin_connections=10, checkin_seconds=1.0, close_sizes=(10_000,), close_rounds=1,
                     startup_repeats=1, scale_devices=(10, 20)),
    "quick": Profile("quick", repeats=3, kernel_sizes=(100_000, 1_000_000, 5_000_000), kernel_n=30,
                     robust_k=(20,), robust_sizes=(1_000_000,), ingest_sizes=(100_000, 1_000_000),
                     ingest_concurrency=(50, 200), ingest_uploads=200, memory_participants=(10, 100, 1_000),
                     memory_params=1_000_000, checkin_devices=(1_000,), checkin_connections=1_000,
                     checkin_seconds=5.0, close_sizes=(1_000_000, 5_000_000), close_rounds=3,
                     startup_repeats=3, scale_devices=(10, 100, 1_000, 10_000)),
    "full": Profile("full", repeats=5, kernel_sizes=(100_000, 1_000_000, 5_000_000), kernel_n=100,
                    robust_k=(20, 50), robust_sizes=(1_000_000, 5_000_000), ingest_sizes=(100_000, 1_000_000),
                    ingest_concurrency=(50, 200), ingest_uploads=400, memory_participants=(10, 100, 1_000),
                    memory_params=1_000_000, checkin_devices=(1_000, 10_000), checkin_connections=1_000,
                    checkin_seconds=10.0, close_sizes=(1_000_000, 5_000_000), close_rounds=5,
                    startup_repeats=5, scale_devices=(10, 100, 1_000, 10_000)),
}


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Result:
    """One figure: our value, the baseline's value measured in the same run, and their ratio.

    ``ratio`` is ours / baseline's for rates (higher is better) and baseline's / ours for times and
    sizes (``lower_is_better``), so that a ratio above 1 always means "better than the baseline".
    """

    name: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    ratio: float = float("nan")
    lower_is_better: bool = False
    target: str = ""
    target_met: bool | None = None
    params: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    # The lowest and highest ratio over the interleaved rounds, where the figure is a median of such rounds.
    ratio_spread: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if math.isnan(self.ratio):
            self.ratio = compute_ratio(self.value, self.baseline_value, self.lower_is_better)


def compute_ratio(value: float, baseline_value: float, lower_is_better: bool = False) -> float:
    """ours/baseline (or baseline/ours when lower is better); NaN when undefined."""
    num, den = (baseline_value, value) if lower_is_better else (value, baseline_value)
    if not (math.isfinite(num) and math.isfinite(den)) or den == 0:
        return float("nan")
    return num / den


def _clean(value: Any) -> Any:
    # JSON has no NaN/Inf: write null instead.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_results(results: Sequence[Result], path: Path, meta: dict[str, Any]) -> None:
    """Write ``results`` as a JSON list of objects (each carries the run's metadata in ``params``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for r in results:
        record = asdict(r)
        record["params"] = {**meta, **r.params}
        records.append(_clean(record))
    path.write_text(json.dumps(records, indent=1) + "\n")


def fmt(value: float) -> str:
    """A number in 4 significant digits with an SI suffix."""
    if not math.isfinite(value):
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    if value == 0 or abs(value) >= 0.01:
        return f"{value:.3g}"
    return f"{value:.2e}"


def table(results: Sequence[Result]) -> str:
    """A Markdown table of the results."""
    lines = ["| figure | ours | unit | baseline | baseline value | ratio | target |",
             "| --- | ---: | --- | --- | ---: | ---: | --- |"]
    for r in results:
        mark = "" if r.target_met is None else (" ✓" if r.target_met else " ✗")
        ratio = f"{r.ratio:.2f}" if math.isfinite(r.ratio) else "-"
        if r.ratio_spread is not None and math.isfinite(r.ratio):
            ratio += f" ({r.ratio_spread[0]:.2f}-{r.ratio_spread[1]:.2f})"
        lines.append(f"| {r.name} | {fmt(r.value)} | {r.unit} | {r.baseline} | {fmt(r.baseline_value)} | "
                     f"{ratio} | {r.target}{mark} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- timing
def best_of(fn: Callable[[], float], repeats: int) -> float:
    """The smallest of ``repeats`` calls of ``fn`` (each returns seconds): the least disturbed run."""
    return min(fn() for _ in range(max(1, repeats)))


def median_of(fn: Callable[[], float], repeats: int) -> float:
    """The median of ``repeats`` calls of ``fn``."""
    return statistics.median(fn() for _ in range(max(1, repeats)))


@dataclass(frozen=True)
class Paired:
    """Seconds of ours and of each baseline over rounds in which every one ran once, in turn."""

    ours: list[float]
    baselines: dict[str, list[float]]

    def median(self, name: str | None = None) -> float:
        """The median seconds of ours (``name`` None) or of one baseline."""
        return statistics.median(self.ours if name is None else self.baselines[name])

    def ratios(self, name: str) -> list[float]:
        """baseline seconds / ours seconds in each round (> 1: ours is faster), rounds in order."""
        return [b / o for o, b in zip(self.ours, self.baselines[name], strict=True)]

    def ratio(self, name: str) -> tuple[float, tuple[float, float]]:
        """The median of the per-round ratios against ``name``, and their lowest and highest."""
        values = self.ratios(name)
        return statistics.median(values), (min(values), max(values))


def interleaved(ours: Callable[[], float], baselines: dict[str, Callable[[], float]], rounds: int) -> Paired:
    """Run ours and every baseline once per round, in turn, for ``rounds`` rounds (each call returns seconds).

    On a shared machine a burst of load then hits ours and its baselines alike, and the per-round ratio
    stays meaningful where the absolute times do not.
    """
    paired = Paired([], {name: [] for name in baselines})
    for _ in range(max(1, rounds)):
        paired.ours.append(ours())
        for name, fn in baselines.items():
            paired.baselines[name].append(fn())
    return paired


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100, nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


# ---------------------------------------------------------------------------------------------- processes
_CHILDREN: list[subprocess.Popen[bytes]] = []


def spawn(args: list[str], *, log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a child process that :func:`kill_all` will end (in its own session, so wrk and co. die too)."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    try:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
    finally:
        if log is not None and not isinstance(out, int):
            out.close()
    _CHILDREN.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; reap. Safe to call twice."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if proc in _CHILDREN:
        _CHILDREN.remove(proc)


def kill_all() -> None:
    """Kill every child still running (the last line of defence: benchmarks stop their own)."""
    for proc in list(_CHILDREN):
        stop(proc, timeout=2.0)


def wait_for(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
             interval: float = 0.02) -> None:
    """Poll ``check`` until it is true; RuntimeError after ``timeout`` or when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        time.sleep(interval)
    raise RuntimeError(f"{what}: not ready after {timeout:g} s")


def rss_peak_bytes(pid: int) -> int:
    """Peak resident set size of a running process (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


# ---------------------------------------------------------------------------------------------- the daemon
class Daemon:
    """A real ``fedscaled start`` child on a temp data dir and a free loopback port; a context manager."""

    def __init__(self, workdir: Path, name: str = "daemon", command: list[str] | None = None) -> None:
        self.data_dir = workdir / name
        self.socket = workdir / f"{name}.sock"
        self.log = workdir / f"{name}.log"
        self.command = command or [sys.executable, "-m", "fedscaled.daemon.cli"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL of the device API."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> Daemon:
        """Start and wait until run.json names the port."""
        run_json = self.data_dir / "run.json"
        with contextlib.suppress(FileNotFoundError):
            run_json.unlink()
        self.proc = spawn([*self.command, "start", "--data-dir", str(self.data_dir), "--listen", "127.0.0.1:0",
                           "--control-socket", str(self.socket), "--log-level", "warning"], log=self.log)
        proc = self.proc

        def ready() -> bool:
            try:
                info = json.loads(run_json.read_text())
            except (OSError, ValueError):
                return False
            if info.get("pid") != proc.pid and len(self.command) > 1:
                return False  # a stale file; (a onefile binary's child has another pid)
            self.port = int(info["port"])
            return True

        try:
            wait_for(ready, timeout, f"daemon (log {self.log})", proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL)."""
        if self.proc is not None:
            stop(self.proc, timeout=15.0)

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        assert self.proc is not None
        return self.proc.pid

    def submit(self, job_text: str) -> dict[str, Any]:
        """Submit a job file's text; its status view (with the enrollment token)."""
        answer: dict[str, Any] = ControlClient(self.socket).call("POST", "/v1/jobs", {"text": job_text})
        return answer

    def status(self, job: str) -> dict[str, Any]:
        """A job's status view."""
        answer: dict[str, Any] = ControlClient(self.socket).call("GET", f"/v1/jobs/{job}")
        return answer

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A temporary folder for data dirs, logs and sockets (short path: Unix sockets have a length limit)."""
    with tempfile.TemporaryDirectory(prefix=f"fsb-{prefix}-") as path:
        yield Path(path)


def input_shape(num_params: int) -> str:
    """An ``input_shape`` for :func:`linear_job`'s model of ``num_params`` whose dimensions stay
    within the config's bound (4096 each).
    The linear model flattens its input, so the parameters, tensor names and shapes are the same."""
    inputs = max(1, num_params // 10)
    for first in range(min(4096, inputs), 0, -1):
        if inputs % first == 0 and inputs // first <= 4096:
            return f"{inputs // first} {first} 1"
    raise ValueError(f"no input_shape of at most 4096 per dimension holds {inputs} inputs")


def linear_job(name: str, num_params: int, participants: int, **extra: Any) -> str:
    """A job file for a linear model of about ``num_params`` parameters (10 classes).

    Selection opens a phase only when the pool holds every device it selects (long selection window),
    so a benchmark controls exactly who takes part; deadlines are long so that nothing times out. Enrollment
    is not rate-limited: a benchmark enrolls its whole fleet from one address within seconds.
    """
    keys: dict[str, Any] = {
        "job_name": name, "model": "linear", "input_shape": input_shape(num_params), "num_classes": 10,
        "rounds": 100, "num_participants": participants, "overcommitment": 1.0,
        "min_participants": participants, "test_participants": participants, "eval_interval": 1000,
        "filter_less": 1, "round_deadline": 600, "selection_window": 120, "checkin_wait": 120,
        "retry_min": 1, "retry_max": 2, "enroll_rate_per_token": 0, "enroll_rate_per_address": 0,
    }
    keys.update(extra)
    lines = ["job_conf:"] + [f"  - {k}: {json.dumps(v) if isinstance(v, bool) else v}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def linear_params(num_params: int) -> int:
    """The exact parameter count of :func:`linear_job`'s model."""
    return max(1, num_params // 10) * 10 + 10


ELIGIBLE = {"battery": 90, "charging": True, "idle": True, "unmetered": True, "free_storage_mb": 1000,
            "num_samples": 50, "backends": ["jax"]}


# ---------------------------------------------------------------------------------------------- a device fleet
async def bounded(limit: int, jobs: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``jobs`` with at most ``limit`` at once; their results in order."""
    sem = asyncio.Semaphore(max(1, limit))

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with sem:
            return await job()

    return list(await asyncio.gather(*(one(j) for j in jobs)))


class Fleet:
    """Enrolled devices of one job, driven by hand over HTTP (like tests/test_restart.py)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, job: str) -> None:
        self.session = session
        self.url = url
        self.job = job
        self.tokens: list[str] = []

    async def _call(self, method: str, path: str, token: str | None = None, *, json_body: Any = None,
                    data: bytes | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if data is not None:
            headers["Content-Type"] = "application/octet-stream"
        async with self.session.request(method, self.url + path, json=json_body, data=data,
                                        headers=headers) as response:
            raw = await response.read()
            if response.content_type == "application/json":
                return response.status, json.loads(raw)
            return response.status, raw

    async def enroll(self, count: int, enrollment_token: str, concurrency: int = 32) -> None:
        """Enroll ``count`` devices."""
        async def one() -> str:
            status, body = await self._call("POST", f"/v1/jobs/{self.job}/enroll",
                                            json_body={"enrollment_token": enrollment_token})
            if status != 201:
                raise RuntimeError(f"enroll answered {status}: {body!r}")
            return str(body["token"])

        self.tokens += await bounded(concurrency, [one] * count)

    async def checkin_all(self, state: dict[str, Any] = ELIGIBLE) -> list[dict[str, Any]]:
        """Every device checks in at once (the daemon holds them until the pool fills)."""
        async def one(token: str) -> dict[str, Any]:
            status, body = await self._call("POST", f"/v1/jobs/{self.job}/checkin", token, json_body=state)
            if status != 200:
                raise RuntimeError(f"check-in answered {status}: {body!r}")
            answer: dict[str, Any] = body
            return answer

        return list(await asyncio.gather(*(one(t) for t in self.tokens)))

    async def post_results(self, answers: Sequence[dict[str, Any]], concurrency: int = 32) -> None:
        """Answer every test task with a plausible result."""
        result = {"samples": 10, "correct_top1": 3, "correct_top5": 9, "loss_sum": 11.0}

        def job(token: str, answer: dict[str, Any]) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                task_id = answer["task"]["task_id"]
                status, body = await self._call("POST", f"/v1/jobs/{self.job}/tasks/{task_id}/result", token,
                                                json_body=result)
                if status != 200:
                    raise RuntimeError(f"result answered {status}: {body!r}")
            return run

        await bounded(concurrency, [job(t, a) for t, a in zip(self.tokens, answers, strict=True)])

    async def get_train_tasks(self) -> list[str]:
        """Check everyone in, run the test phase if it comes first; the train task ids, in token order."""
        for _ in range(3):  # test phase (initial model), then training; bounded
            answers = await self.checkin_all()
            actions = {a["action"] for a in answers}
            if actions == {"train"}:
                return [a["task"]["task_id"] for a in answers]
            if actions == {"test"}:
                await self.post_results(answers)
                continue
            raise RuntimeError(f"unexpected check-in answers: {sorted(actions)}")
        raise RuntimeError("no training round opened")

    async def upload(self, token: str, task_id: str, body: bytes) -> None:
        """PUT one update; RuntimeError unless accepted."""
        status, answer = await self._call("PUT", f"/v1/jobs/{self.job}/tasks/{task_id}/update", token, data=body)
        if status != 200 or not answer.get("accepted"):
            raise RuntimeError(f"upload answered {status}: {answer!r}")

    async def model(self, version: int) -> tuple[int, bytes]:
        """GET models/{version}: (status, body)."""
        status, body = await self._call("GET", f"/v1/jobs/{self.job}/models/{version}", self.tokens[0])
        return status, body if isinstance(body, bytes) else b""


def session(limit: int) -> aiohttp.ClientSession:
    """A client session with at most ``limit`` connections and generous timeouts."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=600))


def start_bare(workdir_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start the bare aiohttp baseline server (bench.bare_server) in ``mode``; (process, base URL)."""
    port_file = workdir_path / f"bare-{mode}.port"
    proc = spawn([sys.executable, "-m", "bench.bare_server", mode, str(port_file)],
                 log=workdir_path / f"bare-{mode}.log")

    def ready() -> bool:
        try:
            return bool(port_file.read_text().strip())
        except OSError:
            return False

    try:
        wait_for(ready, 30.0, f"bare {mode} server", proc)
    except BaseException:
        stop(proc)
        raise
    return proc, f"http://127.0.0.1:{int(port_file.read_text())}"
