"""Running a test's asyncio scenario with every stage bounded, so a stuck test fails with the stacks of what is stuck.

`asyncio.run` waits without limit for the scenario, for leftover tasks to finish cancelling and for the default
executor's threads: one task that ignores cancellation, or one thread that never returns, hangs the whole suite (and
Ctrl-C only cancels the main task again). Here each stage has a deadline; past it the test fails, naming the tasks and
threads that did not finish, and the suite goes on.
"""
from __future__ import annotations

import asyncio
import io
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SCENARIO_TIMEOUT_S = 240  # inside the per-test limit (pyproject: timeout), which dumps every thread's stack
CLEANUP_TIMEOUT_S = 30


def _task_stacks(tasks) -> str:
    out = io.StringIO()
    for task in tasks:
        out.write(f"--- task {task.get_name()}: {task.get_coro()!r}\n")
        task.print_stack(limit=12, file=out)
    return out.getvalue()


def _thread_stacks(threads) -> str:
    frames = sys._current_frames()
    out = io.StringIO()
    for thread in threads:
        out.write(f"--- thread {thread.name}\n")
        frame = frames.get(thread.ident)
        if frame is not None:
            out.write("".join(traceback.format_stack(frame, limit=15)))
    return out.getvalue()


def run(coro, timeout: float = SCENARIO_TIMEOUT_S) -> Any:
    """Run `coro` on a new event loop; fail (never hang) if it, the cleanup or the executor's threads get stuck."""
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="test-to-thread")
    loop.set_default_executor(executor)
    asyncio.set_event_loop(loop)
    main = loop.create_task(coro, name="scenario")
    problems: list[str] = []
    try:
        loop.run_until_complete(asyncio.wait({main}, timeout=timeout))
        if not main.done():
            problems.append(f"the scenario did not finish within {timeout:.0f} s; it was at:\n" + _task_stacks([main]))
            main.cancel()
            loop.run_until_complete(asyncio.wait({main}, timeout=CLEANUP_TIMEOUT_S))
            if not main.done():
                problems.append("and it ignored being cancelled.")
        elif main.exception() is None:
            result = main.result()
    finally:
        # Database units of work finish on their own (cancelling one mid-session is what hangs); then the rest.
        units = [task for task in asyncio.all_tasks(loop) if task.get_name().startswith("uninterrupted ")]
        if units:
            loop.run_until_complete(asyncio.wait(units, timeout=CLEANUP_TIMEOUT_S))
        leftover = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in leftover:
            task.cancel()
        if leftover:
            loop.run_until_complete(asyncio.wait(leftover, timeout=CLEANUP_TIMEOUT_S))
            stuck = [task for task in leftover if not task.done()]
            if stuck:
                problems.append(f"{len(stuck)} task(s) ignored cancellation:\n" + _task_stacks(stuck))
        try:
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), CLEANUP_TIMEOUT_S))
        except TimeoutError:
            problems.append("async generators did not close")
        executor.shutdown(wait=False, cancel_futures=True)
        busy = [thread for thread in threading.enumerate() if thread.name.startswith("test-to-thread")]
        for thread in busy:
            thread.join(timeout=CLEANUP_TIMEOUT_S / max(1, len(busy)))
        busy = [thread for thread in busy if thread.is_alive()]
        if busy:
            problems.append(f"{len(busy)} executor thread(s) never returned:\n" + _thread_stacks(busy))
        asyncio.set_event_loop(None)
        loop.close()
    if main.done() and not main.cancelled() and main.exception() is not None and not problems:
        raise main.exception()
    if problems:
        detail = "\n".join(problems)
        if main.done() and not main.cancelled() and main.exception() is not None:
            raise AssertionError(detail) from main.exception()
        raise AssertionError(detail)
    return result
