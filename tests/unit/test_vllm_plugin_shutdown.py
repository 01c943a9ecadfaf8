"""The vLLM plugin keeps an intentional stop quiet: the output handler's EngineDeadError is an ERROR until a
shutdown begins, DEBUG after (vllm-project/vllm#48745), and nothing else is hidden."""

import logging

import pytest
from vllm.v1.engine import async_llm
from vllm.v1.engine.exceptions import EngineDeadError

from hcxserve.llm import plugin


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records():
    plugin._quiet_intentional_shutdown()
    plugin.shutdown_started.clear()
    handler = Records()
    loggers = [async_llm.logger, plugin.logger]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    yield handler.records
    for log, level in zip(loggers, levels, strict=True):
        log.removeHandler(handler)
        log.setLevel(level)
    plugin.shutdown_started.clear()


def handler_failed(exc: Exception) -> None:
    """What vLLM's output handler does with an exception (vllm/v1/engine/async_llm.py)."""
    try:
        raise exc
    except Exception:
        async_llm.logger.exception("AsyncLLM output_handler failed.")


def errors(records) -> list[type]:
    return [(r.exc_info or (None,))[0] for r in records if r.levelno >= logging.ERROR]


def test_an_engine_death_before_any_shutdown_is_an_error(records):
    handler_failed(EngineDeadError())
    assert errors(records) == [EngineDeadError]


def test_once_shutdown_begins_the_engine_death_is_debug(records):
    async_llm.AsyncLLM.__new__(async_llm.AsyncLLM).shutdown()  # an engine with nothing started: nothing to tear down
    assert plugin.shutdown_started.is_set()
    handler_failed(EngineDeadError())
    handler_failed(ValueError("a real bug"))  # any other failure still logs its traceback
    async_llm.logger.error("AsyncLLM output_handler failed.")  # and so does the message without an exception
    assert errors(records) == [ValueError, None]
    debug = [r for r in records if r.levelno == logging.DEBUG and "stopped during shutdown" in r.getMessage()]
    assert len(debug) == 1


def test_registering_twice_wraps_once(records):
    wrapped = async_llm.AsyncLLM.shutdown
    plugin._quiet_intentional_shutdown()
    assert async_llm.AsyncLLM.shutdown is wrapped
    assert sum(isinstance(f, plugin._ShutdownEngineDead) for f in async_llm.logger.filters) == 1
