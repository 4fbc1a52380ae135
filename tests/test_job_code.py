"""The review's template check: only the exact fedsyft template passes."""

from __future__ import annotations

import pytest

from datasites.adapter.job_code import NotATemplateError, parse_request, render
from fed_tasks.spec import JobSpec

SPEC = JobSpec(job_id="abcd1234", features=("f1", "f2"), label_column="y", rounds=3)


def test_rendered_template_parses_back_to_its_spec():
    assert parse_request(render("site-a", SPEC), "site-a") == SPEC


def test_syft_decorator_line_is_ignored():
    code = "@sy.syft_function(input_policy=p)\n" + render("site-a", SPEC)
    assert parse_request(code, "site-a") == SPEC


def test_template_for_another_site_is_rejected():
    with pytest.raises(NotATemplateError, match="differs from the fedsyft template"):
        parse_request(render("site-b", SPEC), "site-a")


@pytest.mark.parametrize("inject", [
    "    return train\n",
    "    open('/etc/passwd').read()\n",
    "    import socket; socket.create_connection(('127.0.0.1', 80))\n",
])
def test_added_statements_are_flagged(inject):
    code = render("site-a", SPEC)
    lines = code.splitlines(True)
    lines.insert(2, inject)
    with pytest.raises(NotATemplateError):
        parse_request("".join(lines), "site-a")


def test_changed_call_argument_is_flagged():
    code = render("site-a", SPEC).replace("action=action", "action='fit'")
    with pytest.raises(NotATemplateError):
        parse_request(code, "site-a")


def test_arbitrary_function_is_flagged():
    with pytest.raises(NotATemplateError, match="does not pin"):
        parse_request("def f(train, test, action, payload):\n    return train\n", "site-a")
