"""The code a data owner approves: a short, fixed template around one ``JobSpec``.

Rendering from a template means the owner reads ten lines that pin site, job and spec, and
the site can check mechanically that a request *is* the template (see :func:`parse_request`).
"""

from __future__ import annotations

import ast
import hashlib
import textwrap

from fed_tasks.spec import JobSpec

TEMPLATE = '''\
def {func}(train, test, action, payload):
    """fedsyft job {job_id} at {site}: the installed fedsyft site step, nothing else."""
    from datasites.runtime.site_entry import run_approved

    return run_approved(
        site={site!r},
        job_id={job_id!r},
        spec={spec!r},
        train=train,
        test=test,
        action=action,
        payload=payload,
    )
'''


AUTHORITY_TEMPLATE = '''\
def {func}(keyring, action, payload):
    """fedsyft job {job_id}: key authority {site} decrypts checked sums, nothing else."""
    from datasites.runtime.key_authority_site import run_key_authority

    return run_key_authority(
        site={site!r},
        job_id={job_id!r},
        spec={spec!r},
        keyring=keyring,
        action=action,
        payload=payload,
    )
'''

TEMPLATES = {"site": TEMPLATE, "authority": AUTHORITY_TEMPLATE}


class NotATemplateError(ValueError):
    """Submitted code is not exactly the fedsyft job template."""


def function_name(job_id: str, kind: str = "site") -> str:
    return f"fedsyft_job_{job_id}" if kind == "site" else f"fedsyft_authority_{job_id}"


def render(site: str, spec: JobSpec, kind: str = "site") -> str:
    return TEMPLATES[kind].format(func=function_name(spec.job_id, kind), job_id=spec.job_id,
                                  site=site, spec=spec.to_json())


def code_hash(source: str) -> str:
    return hashlib.sha256(textwrap.dedent(source).encode()).hexdigest()


def _function_def(source: str) -> ast.FunctionDef:
    tree = ast.parse(textwrap.dedent(source))
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    if len(tree.body) != 1 or len(funcs) != 1:
        raise NotATemplateError("request code must be exactly one function definition")
    func = funcs[0]
    func.decorator_list = []  # syft keeps the @syft_function line; policies are checked apart
    return func


def _pinned_spec(func: ast.AST) -> JobSpec | None:
    spec = None
    for node in ast.walk(func):
        if isinstance(node, ast.keyword) and node.arg == "spec" and isinstance(
                node.value, ast.Constant) and isinstance(node.value.value, str):
            try:
                spec = JobSpec.from_json(node.value.value)
            except ValueError as exc:
                raise NotATemplateError(f"request pins an invalid job spec: {exc}") from exc
    return spec


def pinned_spec(source: str) -> JobSpec | None:
    """The job spec a (possibly modified) request pins, if any: lets the site keep its
    limits and budget on code a data owner approves by override."""
    try:
        return _pinned_spec(ast.parse(textwrap.dedent(source)))
    except (SyntaxError, NotATemplateError):
        return None


def parse_request(source: str, site: str, kind: str = "site") -> JobSpec:
    """Return the spec pinned by ``source`` if it is exactly the template for ``site``.

    Compares ASTs (formatting and the syft decorator aside), so any added statement, import,
    file or socket access, or changed argument makes the code "not a template".
    """
    func = _function_def(source)
    spec = _pinned_spec(func)
    if spec is None:
        raise NotATemplateError("request code does not pin a fedsyft job spec")
    expected = _function_def(render(site, spec, kind))
    if ast.dump(func) != ast.dump(expected):
        raise NotATemplateError(
            f"request code differs from the fedsyft template for site {site!r} "
            f"(job {spec.job_id!r}): it may run arbitrary code on private data")
    return spec
