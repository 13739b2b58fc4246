"""Structured logs: one JSON object per line, the request id as a field of its own."""

from __future__ import annotations

import json
import logging

from cluster.log_format import JsonFormatter, setup_logging


def test_json_lines_carry_the_request_id_as_a_field():
    record = logging.LogRecord("router.gateway.service", logging.INFO, __file__, 1, "finished (%s)", ("stop",), None)
    record.request_id = "req-42"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "finished (stop)" and entry["request_id"] == "req-42"
    assert entry["level"] == "INFO" and entry["logger"] == "router.gateway.service" and entry["ts"].endswith("Z")


def test_text_format_appends_the_request_id(capsys):
    setup_logging("INFO", "text")
    logging.getLogger("t").info("hello", extra={"request_id": "r1"})
    assert "hello [request_id=r1]" in capsys.readouterr().err
    logging.getLogger().handlers.clear()
