"""Hang-proof, parallel reward engine: per-item deadlines enforced by killing worker processes.

    >>> import rlkit_rewards
    >>> from rlkit_rewards.engine import RewardEngine
    >>> with RewardEngine(num_workers=2, item_timeout=5.0) as engine:
    ...     scores, statuses = engine.score([rlkit_rewards.get("math_accuracy")],
    ...                                     ["1+1?"], ["\\\\boxed{2}"], columns={"answer": ["2"]})
    >>> scores, statuses
    ([[1.0]], ['ok'])

Design (see ``specs/peer-frameworks.md`` sections 7-9):

- A batch is split into one task per item. Each task runs every reward function on that single item
  (``f(prompts=[p], completions=[c], completion_ids=[ids], **{k: [v]})``, TRL's signature) in a pool of
  worker *processes* started with ``spawn`` (not ``fork``: the trainer process has threads). Rewards run
  on a worker's main thread, so math-verify's SIGALRM timeouts work there.
- The pool is our own ``multiprocessing.Process`` objects, one duplex ``Pipe`` each (no shared queue a
  killed worker could leave locked). A task's deadline is ``item_timeout`` from its dispatch to an idle,
  warmed-up worker; a worker that passes it is SIGKILLed, reaped and replaced, and the item gets status
  ``timeout`` with score 0.0 for every function. At ``batch_timeout`` (from the ``score`` call) every
  unfinished item becomes ``timeout`` and its worker is killed. A worker that dies (segfault, OOM
  kill) marks its item ``error`` and is replaced. The pool stays usable after kills.
- Workers start lazily on the first ``score`` and are reused across batches; start-up (imports,
  a math-verify warm-up) is not charged to any item's deadline, but is charged to the batch deadline.
  ``close()`` (also via ``with`` and at interpreter exit) stops and reaps every worker.
- Functions travel by reference, never as code: a function from ``rlkit_rewards.get`` carries
  ``__rlkit_spec__ = (name, options)`` and the worker rebuilds it with ``rlkit_rewards.get`` (after
  importing the module that registered it); any other function must be picklable by reference
  (a top-level function or callable instance; over 1 MiB pickled counts as unpicklable). Reward
  *models* (``nn.Module``) are refused with a TypeError. An unpicklable function (a lambda, a closure) runs
  *in the calling process*, serially, one item at a time, with **no deadline**; a warning is logged
  once per function. Async (coroutine) reward functions are awaited with ``asyncio.run``.
- Statuses, in priority order: ``timeout`` (the item hit a deadline; all its scores 0.0), ``error``
  (a function raised or returned a malformed result; that function's score 0.0, the others kept),
  ``ok`` (the first function's score > 0), ``unparseable`` (the engine's ``answer_check`` finds no answer in
  the completion), ``wrong`` (anything else, including a first score of 0 or None). ``answer_check`` is
  pluggable: ``"math"`` (default: ``text.extract_answer``), ``None`` (no parser: a reward that does not
  score a final answer is never called unparseable), or a top-level function ``completion -> bool``, which
  runs in the workers under the same deadline.
  ``None`` scores (not applicable) come back as NaN.
- ``score`` is synchronous and thread-safe (calls are serialised by a lock); it works from the main
  thread, other threads, and inside a running asyncio loop (it blocks that loop; prefer
  ``await asyncio.to_thread(engine.score, ...)``).
- Nothing evaluates model output as code. Rewards see completions as data only.

Spawn caveat: as with any spawn pool, a script that creates the engine at import time must guard its
entry point with ``if __name__ == "__main__":`` (``python -m pkg`` entry points are fine).
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import inspect
import logging
import math
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import weakref
from multiprocessing.connection import wait as _conn_wait
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

STATUSES = ("ok", "wrong", "unparseable", "timeout", "error")

_STARTUP_TIMEOUT = 60.0  # seconds a fresh worker may take to import and warm up
_MAX_REF_BYTES = 1 << 20  # a picklable reward bigger than this runs in-process instead


# --------------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------------
def _rebuild(ref: tuple) -> Callable:
    kind = ref[0]
    if kind == "spec":
        _, module, name, options = ref
        if module:
            importlib.import_module(module)
        from .registry import get

        return get(name, **options)
    if kind == "pickle":
        return pickle.loads(ref[1])
    raise ValueError(f"unknown function reference kind {kind!r}")


_SHARED = "\x00rlkit_shared"  # key of the per-call keyword arguments inside an item's column dict


def _call_one(func: Callable, prompt: Any, completion: Any, ids: Any, has_ids: bool, cols: dict) -> float | None:
    kwargs = {k: [v] for k, v in cols.items() if k != _SHARED}
    kwargs.update(cols.get(_SHARED) or {})
    if has_ids:
        kwargs["completion_ids"] = [ids]
    out = func(prompts=[prompt], completions=[completion], **kwargs)
    if inspect.iscoroutine(out):
        out = asyncio.run(out)
    out = list(out)
    if len(out) != 1:
        raise ValueError(f"reward returned {len(out)} scores for 1 completion")
    value = out[0]
    return None if value is None else float(value)


def _item_has_answer(completion: Any) -> bool:
    from .text import completion_text, extract_answer

    return extract_answer(completion_text(completion)) is not None


def _has_answer(check: Any, completion: Any) -> bool | None:
    """The answer check of an item: None (no parser), ``"math"`` or a ``completion -> bool`` function."""
    if check is None:
        return True
    if check == "math":
        return _item_has_answer(completion)
    return bool(check(completion))


def _worker_parent_watch(parent_pid: int) -> None:
    while True:  # exit if the parent dies while we are stuck in a long computation
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _worker_main(conn, parent_pid: int, preload: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threading.Thread(target=_worker_parent_watch, args=(parent_pid,), daemon=True).start()
    if preload:
        try:  # warm math-verify (sympy, the latex grammar) off the item clock
            from math_verify import parse, verify

            verify(parse("$1$"), parse("\\boxed{1}"))
            # a pair math-verify settles with sympy's simplify(), whose first call imports
            # sympy.physics.units and more (~0.1-0.25 s) that would otherwise land on the first
            # symbolic item of every fresh or replacement worker
            verify(parse("$\\sqrt{2}$"), parse("\\boxed{2}"))
        except Exception:  # noqa: BLE001 - warm-up only
            pass
    cache: dict[bytes, list[Callable]] = {}
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, key, refs, prompt, completion, ids, has_ids, cols, answer_check = msg
        try:
            funcs = cache.get(key)
            if funcs is None:
                funcs = [_rebuild(r) for r in refs]
                cache[key] = funcs
        except BaseException as exc:  # noqa: BLE001
            conn.send((task_id, None, f"could not rebuild reward functions: {exc!r}", True))
            continue
        values: list[float | None] = []
        errors: list[str | None] = []
        for f in funcs:
            try:
                values.append(_call_one(f, prompt, completion, ids, has_ids, cols))
                errors.append(None)
            except BaseException as exc:  # noqa: BLE001 - includes math-verify's TimeoutException
                values.append(0.0)
                errors.append(f"{getattr(f, '__name__', f)!s}: {exc!r}"[:500])
        try:
            has_answer = _has_answer(answer_check, completion)
        except BaseException:  # noqa: BLE001
            has_answer = True
        conn.send((task_id, values, errors, has_answer))


def light_trainer_state(state: Any) -> Any:
    """A small picklable stand-in for TRL's ``trainer_state`` (the real one carries the whole log
    history): ``global_step``, ``max_steps``, ``epoch`` and ``is_world_process_zero`` as attributes."""
    from types import SimpleNamespace

    get = state.get if isinstance(state, dict) else lambda k, d=None: getattr(state, k, d)
    return SimpleNamespace(global_step=get("global_step", 0), max_steps=get("max_steps", 0), epoch=get("epoch"),
                           is_world_process_zero=get("is_world_process_zero", True))


def _plain_function(func: Callable) -> bool:
    """A module-level function: pickled by reference, it needs no registry in the worker."""
    return inspect.isfunction(func) and "<locals>" not in func.__qualname__ and func.__closure__ is None


# --------------------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------------------
class _Worker:
    __slots__ = ("proc", "conn", "ready", "started_at", "task", "deadline")

    def __init__(self, ctx, preload: bool):
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child_conn, os.getpid(), preload),
                                name="rlkit-reward-worker", daemon=True)
        self.proc.start()
        child_conn.close()
        self.conn = parent_conn
        self.ready = False
        self.started_at = time.monotonic()
        self.task: int | None = None
        self.deadline = math.inf

    def kill(self) -> None:
        try:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=5.0)
        finally:
            try:
                self.conn.close()
            except OSError:
                pass
            try:
                self.proc.close()
            except ValueError:
                pass

    def stop(self) -> None:
        try:
            if self.ready and self.task is None:
                self.conn.send(None)
                self.proc.join(timeout=1.0)
        except (OSError, ValueError):
            pass
        self.kill()


def _close_engine(ref: "weakref.ref[RewardEngine]") -> None:
    engine = ref()
    if engine is not None:
        engine.close()


class RewardEngine:
    """Score reward functions over a batch in spawned worker processes with per-item deadlines.

    Args:
        num_workers: worker processes (started lazily, reused across batches).
        item_timeout: seconds one item (all functions) may run once dispatched; then its worker is killed.
        batch_timeout: seconds one ``score`` call may take; unfinished items become ``timeout``.
        start_method: multiprocessing start method; ``spawn`` (default) is the safe one.
        preload: warm math-verify in each worker at start-up so the first item isn't charged for it.
        answer_check: what tells ``wrong`` from ``unparseable``: ``"math"`` (a final math answer can be
            extracted), None (never ``unparseable``) or a top-level function ``completion -> bool``.
    """

    def __init__(self, num_workers: int = 2, item_timeout: float = 5.0, batch_timeout: float = 60.0,
                 start_method: str = "spawn", preload: bool = True, answer_check: Any = "math"):
        if answer_check is not None and answer_check != "math":
            if not callable(answer_check):
                raise ValueError(f"answer_check must be 'math', None or a function, got {answer_check!r}")
            try:
                pickle.dumps(answer_check)
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"answer_check must be a top-level function (it runs in the workers): {exc!r}") \
                    from None
        self.answer_check = answer_check
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if item_timeout <= 0 or batch_timeout <= 0:
            raise ValueError("item_timeout and batch_timeout must be > 0")
        self.num_workers = int(num_workers)
        self.item_timeout = float(item_timeout)
        self.batch_timeout = float(batch_timeout)
        self.start_method = start_method
        self.preload = preload
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._lock = threading.RLock()
        self._closed = False
        self._warned: set[int] = set()
        self.stats = {s: 0 for s in STATUSES}
        self.stats["workers_killed"] = 0
        self.last_item_seconds: list[float] = []  # per item of the last batch: dispatch -> result seconds
        atexit.register(_close_engine, weakref.ref(self))

    # ---- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop and reap every worker. The engine can't be used afterwards."""
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
            for w in workers:
                w.stop()

    def __enter__(self) -> "RewardEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; atexit and close() are the real paths
        try:
            if not self._closed:
                self.close()
        except Exception:  # noqa: BLE001
            pass

    def _spawn(self) -> _Worker:
        w = _Worker(self._ctx, self.preload)
        self._workers.append(w)
        return w

    def _replace(self, w: _Worker) -> None:
        w.kill()
        if w in self._workers:
            self._workers.remove(w)

    # ---- function references -----------------------------------------------------------------------
    def _reference(self, func: Callable) -> tuple | None:
        spec = getattr(func, "__rlkit_spec__", None)
        if spec is not None and not _plain_function(func):
            name, options = spec
            from .registry import _REGISTRY

            factory = _REGISTRY.get(name)
            module = getattr(factory, "__module__", None)
            try:
                pickle.dumps(options)
                return ("spec", module, name, dict(options))
            except Exception:  # noqa: BLE001
                pass
        if hasattr(func, "forward") and hasattr(func, "parameters"):
            raise TypeError(f"RewardEngine scores reward functions, not reward models ({type(func).__name__}); "
                            "score model rewards outside the engine")
        try:
            data = pickle.dumps(func)
            pickle.loads(data)
            if len(data) > _MAX_REF_BYTES:
                raise ValueError(f"pickled reward is {len(data)} bytes; it would be sent with every item")
            return ("pickle", data)
        except Exception:  # noqa: BLE001
            if id(func) not in self._warned:
                self._warned.add(id(func))
                logger.warning(
                    "reward %r is not picklable by reference; it runs in-process, serially and without a "
                    "deadline. Register it (rlkit_rewards.register) or make it a top-level function.",
                    getattr(func, "__name__", func))
            return None

    # ---- scoring -----------------------------------------------------------------------------------
    def score(self, funcs: Sequence[Callable], prompts: Sequence[Any], completions: Sequence[Any],
              completion_ids: Sequence[Any] | None = None, columns: dict[str, Sequence[Any]] | None = None,
              kwargs: dict[str, Any] | None = None) -> tuple[list[list[float]], list[str]]:
        """Return ``(scores, statuses)``: ``scores[i][j]`` is function ``j`` on item ``i`` (NaN for None),
        ``statuses[i]`` one of ``ok, wrong, unparseable, timeout, error``.

        ``columns`` hold one value per item (each function sees ``[value]`` for its one item); ``kwargs``
        are passed unchanged to every call (e.g. TRL's ``trainer_state``); both must be picklable."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardEngine is closed")
            return self._score(list(funcs), list(prompts), list(completions), completion_ids, columns or {},
                               dict(kwargs or {}))

    def _score(self, funcs, prompts, completions, completion_ids, columns, shared):
        n, m = len(completions), len(funcs)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts but {n} completions")
        if completion_ids is not None and len(completion_ids) != n:
            raise ValueError(f"{len(completion_ids)} completion_ids but {n} completions")
        for k, v in columns.items():
            if len(v) != n:
                raise ValueError(f"column {k!r} has {len(v)} values but there are {n} completions")
        t0 = time.monotonic()
        batch_deadline = t0 + self.batch_timeout
        has_ids = completion_ids is not None
        refs = [self._reference(f) for f in funcs]
        remote = [j for j, r in enumerate(refs) if r is not None]
        local = [j for j, r in enumerate(refs) if r is None]

        scores = [[0.0] * m for _ in range(n)]
        errored = [False] * n
        timed_out = [False] * n
        has_answer: list[bool | None] = [None] * n

        def cols_of(i):
            cols = {k: v[i] for k, v in columns.items()}
            if shared:
                cols[_SHARED] = shared
            return cols

        if remote and n:
            key = pickle.dumps([refs[j] for j in remote])
            self._run_remote(key, [refs[j] for j in remote], remote, prompts, completions, completion_ids,
                             has_ids, cols_of, batch_deadline, scores, errored, timed_out, has_answer)
        for j in local:  # unpicklable: in-process, serial, no deadline
            for i in range(n):
                if timed_out[i]:
                    continue
                try:
                    v = _call_one(funcs[j], prompts[i], completions[i],
                                  completion_ids[i] if has_ids else None, has_ids, cols_of(i))
                    scores[i][j] = math.nan if v is None else v
                except Exception as exc:  # noqa: BLE001
                    logger.warning("reward %r raised on item %d: %r", getattr(funcs[j], "__name__", funcs[j]), i, exc)
                    scores[i][j] = 0.0
                    errored[i] = True

        statuses = []
        for i in range(n):
            if timed_out[i]:
                st = "timeout"
            elif errored[i]:
                st = "error"
            elif m and scores[i][0] > 0:  # NaN > 0 is False
                st = "ok"
            else:
                ans = has_answer[i]
                if ans is None:
                    try:
                        ans = _has_answer(self.answer_check, completions[i])
                    except Exception:  # noqa: BLE001
                        ans = True
                st = "wrong" if ans else "unparseable"
            statuses.append(st)
            self.stats[st] += 1
        return scores, statuses

    def _run_remote(self, key, refs, remote, prompts, completions, completion_ids, has_ids, cols_of,
                    batch_deadline, scores, errored, timed_out, has_answer):
        n = len(completions)
        item_seconds = self.last_item_seconds = [math.nan] * n
        sent_at: dict[int, float] = {}
        pending = list(range(n - 1, -1, -1))  # pop() from the end = item order
        done = 0
        task_of: dict[int, int] = {}
        task_seq = 0

        def finish_timeout(w: _Worker, i: int) -> None:
            nonlocal done
            timed_out[i] = True
            for j in remote:
                scores[i][j] = 0.0
            done += 1
            item_seconds[i] = time.monotonic() - sent_at[i]
            self.stats["workers_killed"] += 1
            self._replace(w)

        while done < n:
            now = time.monotonic()
            # keep the pool at size (lazily) while there is work left
            while pending and len(self._workers) < self.num_workers:
                self._spawn()
            # dispatch to idle, ready workers
            for w in list(self._workers):
                if not pending:
                    break
                if w.ready and w.task is None:
                    i = pending.pop()
                    task_seq += 1
                    msg = (task_seq, key, refs, prompts[i], completions[i],
                           completion_ids[i] if has_ids else None, has_ids, cols_of(i), self.answer_check)
                    try:
                        w.conn.send(msg)
                    except (pickle.PicklingError, TypeError, AttributeError) as exc:
                        logger.warning("item %d could not be sent to a worker: %r", i, exc)
                        errored[i] = True
                        done += 1
                        self._replace(w)  # the pipe may hold a partial message
                        continue
                    except (OSError, EOFError, ValueError):
                        pending.append(i)
                        self._replace(w)
                        continue
                    w.task = i
                    task_of[task_seq] = i
                    sent_at[i] = time.monotonic()
                    w.deadline = min(sent_at[i] + self.item_timeout, batch_deadline)
            if done >= n:
                break
            # wait for results / readiness / deadlines
            now = time.monotonic()
            next_deadline = batch_deadline
            for w in self._workers:
                if w.task is not None:
                    next_deadline = min(next_deadline, w.deadline)
                elif not w.ready:
                    next_deadline = min(next_deadline, w.started_at + _STARTUP_TIMEOUT)
            conns = {w.conn: w for w in self._workers}
            ready = _conn_wait(list(conns), timeout=max(0.0, next_deadline - now)) if conns else []
            for c in ready:
                w = conns[c]
                try:
                    msg = c.recv()
                except (EOFError, OSError):
                    msg = None
                if msg is None:  # died
                    if w.task is not None:
                        i = w.task
                        errored[i] = True
                        for j in remote:
                            scores[i][j] = 0.0
                        done += 1
                        logger.warning("reward worker died (exit code %s) on item %d", w.proc.exitcode, i)
                    else:
                        logger.warning("reward worker died during start-up (exit code %s)", w.proc.exitcode)
                    self._replace(w)
                    continue
                if not w.ready:
                    w.ready = msg[0] == "ready"
                    continue
                task_id, values, errors, ans = msg
                i = task_of.pop(task_id, None)
                w.task, w.deadline = None, math.inf
                if i is None:
                    continue
                done += 1
                item_seconds[i] = time.monotonic() - sent_at[i]
                if values is None:  # could not rebuild the functions
                    errored[i] = True
                    logger.warning("item %d: %s", i, errors)
                    continue
                has_answer[i] = ans
                for j, v, e in zip(remote, values, errors):
                    scores[i][j] = math.nan if v is None else v
                    if e is not None:
                        errored[i] = True
                        scores[i][j] = 0.0
                        logger.warning("reward raised on item %d: %s", i, e)
            # deadlines
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now >= w.deadline:
                    i = w.task
                    logger.warning("item %d passed its deadline; killing reward worker pid %s", i, w.proc.pid)
                    finish_timeout(w, i)
                elif not w.ready and now >= w.started_at + _STARTUP_TIMEOUT:
                    logger.warning("reward worker did not start within %.0f s; replacing it", _STARTUP_TIMEOUT)
                    self._replace(w)
            if now >= batch_deadline:
                for w in list(self._workers):
                    if w.task is not None:
                        finish_timeout(w, w.task)
                while pending:
                    i = pending.pop()
                    timed_out[i] = True
                    for j in remote:
                        scores[i][j] = 0.0
                    done += 1
                if any(not w.ready for w in self._workers):
                    for w in [w for w in self._workers if not w.ready]:
                        self._replace(w)
                break

    # ---- TRL drop-in -------------------------------------------------------------------------------
    def wrap(self, func: Callable) -> Callable:
        """A TRL-signature reward function that scores ``func`` through this engine (timeouts and
        errors score 0.0, not-applicable rows None)."""

        def engine_reward(prompts, completions, completion_ids=None, **columns):
            per_item = {k: v for k, v in columns.items()
                        if isinstance(v, (list, tuple)) and len(v) == len(completions)}
            shared = {}
            if columns.get("trainer_state") is not None:
                shared["trainer_state"] = light_trainer_state(columns["trainer_state"])
            scores, _ = self.score([func], prompts, completions, completion_ids, per_item, kwargs=shared)
            return [None if math.isnan(s[0]) else s[0] for s in scores]

        engine_reward.__name__ = getattr(func, "__name__", "engine_reward")
        return engine_reward
