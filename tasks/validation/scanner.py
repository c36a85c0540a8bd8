"""Running ``scan.scan_chunk`` over a dataset: local worker processes, Ray tasks, or this process.

``Scanner`` starts the work before the caller does other setup and yields every sample's row once, in no set
order; a pool that breaks or stalls hands the rest of the chunks to this process. The per-image measuring
itself is ``damage.tasks.validation.scan``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from damage.tasks.validation.scan import Sample, scan_chunk

if TYPE_CHECKING:
    from damage.tasks.core.config import RayConfig


def _scan_chunk_on_worker(chunk: tuple[list[tuple[int, str, str | None]], int], threads: int
                          ) -> list[tuple[int, tuple, list[tuple]]]:
    """``scan_chunk`` as a Ray task: this worker's thread count pinned first."""
    from damage.tasks.scale.ray_runtime import apply_worker_threads

    apply_worker_threads(threads)
    return scan_chunk(chunk)


def worker_count(requested: int) -> int:
    """0 = every CPU this process may use."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def _init_worker() -> None:
    """Worker processes decode one image at a time each; OpenCV's own thread pool would only
    oversubscribe the cores (and must not be touched after a fork)."""
    import cv2

    cv2.setNumThreads(1)


def _start_method() -> str:
    """A fork server: workers fork from a small clean process (this module, cv2, numpy), never
    from the caller. Forking the caller directly is unsafe: native threads (OpenCV's pool after
    any cv2.resize, jemalloc, Prefect's runners) leave locks held in the child, which then hangs.
    As with any non-fork start method, a script that calls this must guard its entry point
    with ``if __name__ == "__main__":`` (if not, the pool breaks and the scan runs in-process)."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


class Scanner:
    """Scan samples in worker processes, started before the caller does other setup.

    ``start()`` submits all chunks and returns at once, so the parent can import Great
    Expectations while the workers read and decode; ``results()`` then yields rows as they
    arrive. If the pool breaks (a worker killed, or a script without an
    ``if __name__ == "__main__":`` guard under a fork server) or makes no progress for
    ``stall_timeout_s``, the remaining chunks are scanned in this process instead of waiting
    forever.
    """

    def __init__(self, samples: list[Sample], max_pixels: int, workers: int, chunk_size: int = 32,
                 stall_timeout_s: float = 300.0, ray: RayConfig | None = None):
        items = [(i, s.image, s.label) for i, s in enumerate(samples)]
        self.chunks = [(items[i:i + chunk_size], max_pixels) for i in range(0, len(items), chunk_size)]
        self.workers = min(worker_count(workers), max(1, len(self.chunks)))
        self.broken: str | None = None
        self.stall_timeout_s = stall_timeout_s
        self.ray = ray
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict = {}
        self._ray_refs: dict = {}

    def start(self) -> Scanner:
        if self.ray is not None and self.chunks:
            self._start_ray()
            return self
        # Pool start-up costs ~0.1-0.5 s; below a few chunks per worker it does not pay off.
        if self.workers > 1 and len(self.chunks) >= 2 * self.workers:
            method = _start_method()
            ctx = mp.get_context(method)
            if method == "forkserver":
                ctx.set_forkserver_preload(["damage.tasks.validation.scanner", "cv2", "numpy"])
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker)
            self._futures = {self._pool.submit(scan_chunk, c): n for n, c in enumerate(self.chunks)}
        return self

    def _start_ray(self) -> None:
        """One Ray task per chunk (Ray connected by the caller), ``ray.worker_threads`` CPUs each, retried
        when its worker dies; the dataset is read where it lies (every worker must see the path)."""
        from damage.tasks.scale.fanout import step_env
        from damage.tasks.scale.ray_runtime import require_ray, resolve_address
        from damage.tasks.scale.shards import MAX_RETRIES

        ray = require_ray()
        threads = self.ray.worker_threads
        remote = ray.remote(_scan_chunk_on_worker).options(
            num_cpus=threads, max_retries=MAX_RETRIES,
            runtime_env={"env_vars": step_env(threads, forward_secrets=resolve_address(self.ray) is None)})
        self._ray_refs = {remote.remote(c, threads): n for n, c in enumerate(self.chunks)}

    def _ray_results(self, done: set[int]) -> Iterator[tuple[int, tuple, list[tuple]]]:
        from damage.tasks.scale.ray_runtime import require_ray

        ray = require_ray()
        pending = list(self._ray_refs)
        try:
            while pending:
                finished, pending = ray.wait(pending, num_returns=1, timeout=self.stall_timeout_s)
                if not finished:
                    raise TimeoutError(f"no scan progress on Ray for {self.stall_timeout_s:.0f} s")
                for ref in finished:
                    rows = ray.get(ref)
                    done.add(self._ray_refs[ref])
                    yield from rows
        except Exception as e:  # a chunk failing after its retries, a lost cluster, a stall
            self.broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logging.getLogger(__name__).warning(
                "validation scan: Ray workers failed (%s); scanning the rest in this process", self.broken)
            for ref in pending:
                ray.cancel(ref, force=True)
        self._ray_refs = {}

    def results(self) -> Iterator[tuple[int, tuple, list[tuple]]]:
        done: set[int] = set()
        if self._ray_refs:
            yield from self._ray_results(done)
        if self._pool is not None:
            pending = set(self._futures)
            try:
                while pending:
                    finished, pending = wait(pending, timeout=self.stall_timeout_s, return_when=FIRST_COMPLETED)
                    if not finished:
                        raise TimeoutError(f"no scan progress for {self.stall_timeout_s:.0f} s")
                    for fut in finished:
                        rows = fut.result()
                        done.add(self._futures[fut])
                        yield from rows
            except (BrokenProcessPool, TimeoutError) as e:
                self.broken = str(e) or "worker process died"
                logging.getLogger(__name__).warning(
                    "validation scan: worker pool failed (%s); scanning the rest in this process", self.broken)
                self._kill()
        for n, chunk in enumerate(self.chunks):
            if n not in done:
                yield from scan_chunk(chunk)

    def _kill(self) -> None:
        """Stop a stuck or broken pool without waiting for its workers."""
        if self._pool is not None:
            for proc in list(getattr(self._pool, "_processes", {}).values()):
                proc.terminate()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Scanner:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
