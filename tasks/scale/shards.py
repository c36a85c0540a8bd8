"""Per-image work over a Ray Data actor pool: ``damage predict --ray`` (``batch.py``), ``damage evaluate
--ray``, ``damage sweep --ray`` and ``damage data issues --ray``.

The items are the indices ``0..n-1`` of a split (or of a list of images). Each worker builds the per-image
function once (``factory(**kwargs)``: opens the model, loads the split, warms up) with an explicit thread
count, and returns for each index what the single-process loop computes for it, by calling the same object; the driver puts the
results back in index order, so what follows (metrics, ranking) is computed from the same inputs in the same
order as without Ray.

Files named in ``ship`` (the model) travel through Ray's object store and are checked against their SHA-256 on
every worker, so a cluster node needs no copy of the driver's files; the dataset is read where it lies (a path
every worker can read: this machine for an embedded Ray, a shared volume on a cluster).

A worker that dies mid-batch is restarted and its batch retried (``MAX_RETRIES``); results only come back for
whole batches, so an index is never lost or returned twice (checked here).

Example:
    >>> out = map_indices(len(ds), ImageScorer, {"model": "best.onnx", "data_yaml": "d/data.yaml"}, cfg.ray,
    ...                   ship=("model",))
    >>> len(out) == len(ds)
    True
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from damage.tasks.core.errors import DamageError
from damage.tasks.scale.fanout import step_env
from damage.tasks.scale.ray_runtime import apply_worker_threads, cluster_cpus, require_ray, resolve_address

if TYPE_CHECKING:
    from damage.tasks.core.config import RayConfig

# A batch whose worker died is retried this many times, then the run fails: an item that kills its worker
# every time must not restart actors forever.
MAX_RETRIES = 3


class ShippedFile:
    """A file's bytes in Ray's object store and their SHA-256; ``materialize`` writes a checked local copy."""

    def __init__(self, path: str | Path) -> None:
        ray = require_ray()
        data = Path(path).read_bytes()
        self.ref = [ray.put(data)]  # in a list: Ray hands the actor the reference, not the bytes
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.suffix = Path(path).suffix

    def materialize(self, folder: Path, stem: str = "model") -> Path:
        """The bytes as ``folder/<stem><suffix>``, after checking them against the SHA-256.

        Raises:
            DamageError: what arrived is not what was sent.
        """
        ray = require_ray()
        data = ray.get(self.ref[0])
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise DamageError(f"the {stem} file received by a Ray worker does not match its SHA-256")
        path = folder / f"{stem}{self.suffix}"
        path.write_bytes(data)
        return path


class IndexActor:
    """One Ray Data worker: ``factory(**kwargs)`` built once (shipped files made local first), then called
    with each batch's indices; returns one result per index."""

    def __init__(self, factory: Callable[..., Any], kwargs: dict[str, Any], shipped: dict[str, ShippedFile],
                 threads: int) -> None:
        apply_worker_threads(threads)  # before torch/ONNX Runtime/OpenCV start their pools
        self._dir = tempfile.TemporaryDirectory(prefix="damage-shard-")
        self.fn: Callable[[list[int]], Any] | None = None
        self.error = ""
        try:
            local = {k: f.materialize(Path(self._dir.name), k) for k, f in shipped.items()}
            self.fn = factory(**{**kwargs, **local})
        except DamageError as e:  # a bad model or dataset: the user's error, returned as such (not retried)
            self.error = str(e)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        ids = [int(i) for i in batch["id"]]
        out, error = [], self.error
        if self.fn is not None:
            try:
                out = list(self.fn(ids))
            except DamageError as e:  # Ray would wrap it past recognition: it travels as a value instead
                error = str(e)
            if not error and len(out) != len(ids):
                error = f"a Ray worker returned {len(out)} results for {len(ids)} items"
        if error:
            out = [None] * len(ids)
        return {"id": ids, "out": out, "error": [error] * len(ids)}


def plan_workers(cfg: RayConfig, n_items: int) -> int:
    """Workers to start: ``ray.workers``, else the cluster's CPUs over ``ray.worker_threads``; never more
    than the items."""
    n = cfg.workers or max(1, cluster_cpus() // cfg.worker_threads)
    return max(1, min(n, n_items))


def iter_indices(n: int, factory: Callable[..., Any], kwargs: Mapping[str, Any], cfg: RayConfig,
                 ship: Iterable[str] = ()) -> Iterator[tuple[int, Any]]:
    """``factory(**kwargs)(indices)`` over ``0..n-1`` on a pool of Ray actors; yields ``(index, result)`` as
    batches finish (in no set order), each index exactly once. Ray must be connected (``ray_runtime.connect``).

    Args:
        n: the number of items.
        factory: builds a worker's per-item function, ``fn(list[int]) -> list[result]`` (a class or a
            module-level function: it is sent to the workers by reference).
        kwargs: the factory's arguments (paths, settings); those named in ``ship`` are files sent to the workers.
        cfg: the ``ray:`` section (``workers``, ``worker_threads``, ``batch_size``).
        ship: keys of ``kwargs`` whose files travel through the object store (the model).

    Raises:
        DamageError: a worker's own ``DamageError`` (a bad model, an unreadable dataset: its message as is), a
            batch still failing after ``MAX_RETRIES`` worker restarts, or an index returned other than once.
    """
    ray = require_ray()
    if n <= 0:
        return
    kwargs = dict(kwargs)
    shipped = {k: ShippedFile(kwargs.pop(k)) for k in ship}
    workers = plan_workers(cfg, n)
    threads = cfg.worker_threads
    # the items from the driver's memory: a read stage (ray.data.range) would need a CPU of its own, which
    # actors holding every CPU of a small cluster never free
    ds = ray.data.from_items([{"id": i} for i in range(n)], override_num_blocks=min(n, max(workers * 4, 1)))
    ds = ds.map_batches(
        IndexActor, batch_size=cfg.batch_size, batch_format="numpy", concurrency=workers, num_cpus=threads,
        max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES,
        runtime_env={"env_vars": step_env(threads, forward_secrets=resolve_address(cfg) is None)},
        fn_constructor_kwargs={"factory": factory, "kwargs": kwargs, "shipped": shipped, "threads": threads})
    seen = [False] * n
    try:
        for row in ds.iter_rows():
            if row["error"]:
                raise DamageError(str(row["error"]))
            i = int(row["id"])
            if not 0 <= i < n or seen[i]:
                raise DamageError(f"Ray returned item {i} {'twice' if 0 <= i < n else 'out of range'}")
            seen[i] = True
            yield i, row["out"]
    except DamageError:
        raise
    except Exception as e:  # ray.exceptions.RayTaskError/ActorDiedError after the retries are spent
        raise DamageError(f"Ray workers failed after {MAX_RETRIES} retries: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    missing = [i for i, s in enumerate(seen) if not s]
    if missing:
        raise DamageError(f"Ray lost {len(missing)} of {n} item(s), e.g. item {missing[0]}")


def map_indices(n: int, factory: Callable[..., Any], kwargs: Mapping[str, Any], cfg: RayConfig,
                ship: Iterable[str] = (), on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
    """``iter_indices``'s results in index order; ``on_result(index, result)`` is called on the driver as each
    arrives (a progress bar).

    Raises:
        DamageError: as ``iter_indices``.
    """
    out: list[Any] = [None] * max(n, 0)
    for i, r in iter_indices(n, factory, kwargs, cfg, ship):
        out[i] = r
        if on_result is not None:
            on_result(i, r)
    return out
