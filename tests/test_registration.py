"""How users hand their models to goinfer, and single-machine mode (`goinfer up`)."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from goinfer import Model
from goinfer.client import Client
from goinfer.models.echo import Echo
from goinfer.models.registry import ModelError, ModelRegistry, check_model_class, import_model

from conftest import APP_ID, APP_SECRET, SM2_PRIVATE_KEY, TESTS, free_port, url_of, wait_until, write_settings


def test_a_model_missing_a_hook_is_named():
    class NoInfer(Model):
        api_path = "/api/x"

        def init(self) -> None: ...

        def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
            return data

    with pytest.raises(ModelError, match="model .*NoInfer does not define infer"):
        ModelRegistry([NoInfer])


def test_a_model_without_api_path_is_named():
    class NoPath(Model):
        def init(self) -> None: ...

        def api_entry(self, data): return data

        def infer(self, request_id, params): return params

    with pytest.raises(ModelError, match="model .*NoPath does not define api_path"):
        ModelRegistry([NoPath])


def _model(**hooks: Any) -> type:
    """A model with working hooks, except those given."""
    namespace: dict[str, Any] = {
        "api_path": "/api/sig",
        "init": lambda self: None,
        "api_entry": lambda self, data: data,
        "infer": lambda self, request_id, params: params,
        **hooks,
    }
    return type("Sig", (Model,), namespace)


@pytest.mark.parametrize("hooks, message", [
    ({"infer": lambda self, params: params}, "infer must accept infer(self, request_id, params); it is "
                                             "infer(self, params) (too many positional arguments)"),
    ({"infer": lambda self, request_id, params, extra: params}, "infer must accept infer(self, request_id, params)"),
    ({"api_entry": lambda self: {}}, "api_entry must accept api_entry(self, data)"),
    ({"api_entry": staticmethod(lambda: {})}, "api_entry must accept api_entry(self, data)"),
    ({"init": lambda self, weights: None}, "init must accept init(self); it is init(self, weights) "
                                           "(missing a required argument: 'weights')"),
    ({"infer_batch": lambda self: []}, "infer_batch must accept infer_batch(self, batch)"),
    ({"infer": 42}, "infer must be a method infer(self, request_id, params), got 42"),
])
def test_a_hook_with_the_wrong_signature_is_named(hooks, message):
    with pytest.raises(ModelError) as refused:
        ModelRegistry([_model(**hooks)])
    assert str(refused.value).startswith(f"model Sig: {message}"), str(refused.value)


def test_an_async_hook_is_refused():
    async def infer(self, request_id, params):
        return params

    with pytest.raises(ModelError, match="model Sig: infer must be a plain method infer\\(self, request_id, "
                                         "params\\), not async"):
        ModelRegistry([_model(infer=infer)])


@pytest.mark.parametrize("hooks", [
    {},
    {"infer": lambda self, *args: {}},
    {"infer": lambda self, request_id, params, extra=None: params},
    {"api_entry": staticmethod(lambda data: data)},
    {"api_entry": classmethod(lambda cls, data: data)},
    {"infer_batch": lambda self, batch: []},
    {"infer_batch": None},  # not callable: simply not batched
])
def test_hooks_the_framework_can_call_are_accepted(hooks):
    assert len(ModelRegistry([_model(**hooks)])) == 1


def test_a_dispatcher_refuses_a_model_with_a_wrong_signature(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=["sample_models:WrongInferSignature"],
                              Server={"MaxWorkers": 1})
    server = processes.server(settings, wait=False)
    assert server.process.wait(60) == 1
    assert "model WrongInferSignature: infer must accept infer(self, request_id, params)" in server.output


def test_bad_class_attributes_fail_at_definition():
    with pytest.raises(TypeError, match="BadPath.api_path must be a string"):
        class BadPath(Model):  # noqa: F841
            api_path = 42
    with pytest.raises(TypeError, match="BadQueue.queue must be a string"):
        class BadQueue(Model):  # noqa: F841
            queue = None or 7


def test_duplicate_api_paths_and_non_models_are_refused():
    with pytest.raises(ModelError, match="share api_path '/api/echo'"):
        ModelRegistry([import_model("goinfer.models.echo:Echo"), _echo_twin()])
    with pytest.raises(ModelError, match="not a subclass of goinfer.Model"):
        import_model("goinfer.cli:main")


def _echo_twin() -> type:
    class EchoTwin(Model):
        api_path = "/api/echo"

        def init(self) -> None: ...

        def api_entry(self, data): return data

        def infer(self, request_id, params): return params

    return EchoTwin


def test_user_click_program(tmp_path, redis_server, processes):
    """go-infer's pattern: register the model in your program, add goinfer's commands to it."""
    settings = write_settings(tmp_path, redis_server.address, Models=[])
    program = [sys.executable, str(TESTS / "user_cli.py")]
    help_text = processes.start("--help", program=program)
    help_text.process.wait(30)
    assert "My greeting service." in help_text.output and "server" in help_text.output
    processes.start("server", "0", "--yaml", str(settings), program=program).wait_for_output(
        "dispatcher for queue 0 ready", 60)
    http = processes.start("http", "--yaml", str(settings), program=program)
    http.wait_for_output("serving /api/greet")
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SM2", sm2_private_key=SM2_PRIVATE_KEY)
    wait_until(lambda: _answers(api), 30, "the user's program to answer")
    assert api.call("/api/greet", {"name": "Lin"})["greeting"] == "hello, Lin"


def _answers(api: Client) -> bool:
    try:
        api.call("/api/greet", {"name": "x"})
        return True
    except OSError:
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_up_runs_everything_with_a_private_redis(tmp_path, processes):
    redis_port = free_port()
    settings = write_settings(tmp_path, f"127.0.0.1:{redis_port}", Server={"RedisPasswd": "s3cret-pw"})
    up = processes.start("up", "--yaml", str(settings))
    up.wait_for_output("started a private redis-server", 30)
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SM2", sm2_private_key=SM2_PRIVATE_KEY)
    wait_until(lambda: _echo_answers(api), 60, "goinfer up to answer")
    assert api.call("/api/greet", {"name": "Up"})["greeting"] == "hello, Up"
    assert _port_open(redis_port)
    assert up.stop(signal.SIGTERM, timeout=60) == 0
    assert not _port_open(redis_port), "the private redis-server must stop with goinfer up"
    assert "s3cret-pw" not in up.output
    assert "Traceback" not in up.output


def _echo_answers(api: Client) -> bool:
    try:
        return api.call("/api/echo", {"a": 1})["a"] == 1
    except OSError:
        return False


def test_noapi_models_are_served_but_not_routed(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address,
                              Models=["goinfer.models.echo:Echo", "sample_models:Hidden"])
    http = processes.http(settings)
    server = processes.server(settings)
    assert "serving /api/echo" in http.output and "__noapi__" not in http.output
    assert "sample_models:Hidden" in server.output  # the dispatcher's workers load it


def test_up_reports_a_child_that_dies_and_stops_the_rest(tmp_path, processes):
    settings = write_settings(tmp_path, f"127.0.0.1:{free_port()}")
    up = processes.start("up", "--yaml", str(settings))
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256")
    wait_until(lambda: _echo_answers(api), 60, "goinfer up to answer")
    http_pid = int(up.output.split("HTTP tier on")[0].rsplit("[", 1)[1].split("]")[0])
    os.kill(http_pid, signal.SIGKILL)
    assert up.process.wait(60) == 1
    assert "http exited with code -9; stopping everything" in up.output


def test_quick_start_model_next_to_the_settings_file(tmp_path, redis_server, processes):
    """The README's model example: a module in the working directory, the `goinfer` script."""
    (tmp_path / "mymodels.py").write_text(
        "from goinfer import ApiError, Model\n\n"
        "class Reverse(Model):\n"
        "    api_path = '/api/reverse'\n\n"
        "    def init(self):\n"
        "        self.suffix = self.customer.get('Suffix', '')\n\n"
        "    def api_entry(self, data):\n"
        "        if not isinstance(data.get('text'), str):\n"
        "            raise ApiError(1001, 'need text')\n"
        "        return {'text': data['text']}\n\n"
        "    def infer(self, request_id, params):\n"
        "        return {'reversed': params['text'][::-1] + self.suffix}\n")
    settings = write_settings(tmp_path, redis_server.address, Models=["mymodels:Reverse"], Customer={"Suffix": "!"})
    script = [str(Path(sys.executable).parent / "goinfer")]
    env = {"PYTHONPATH": ""}  # nothing but the working directory makes mymodels importable
    processes.start("server", "0", "--yaml", str(settings), program=script, env=env).wait_for_output(
        "dispatcher for queue 0 ready", 60)
    processes.http(settings, program=script, env=env)
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SM2", sm2_private_key=SM2_PRIVATE_KEY)
    assert api.call("/api/reverse", {"text": "hello"})["reversed"] == "olleh!"


def test_a_model_keeps_a_config_of_its_own_and_a_warmup_hook_is_checked(tmp_path):
    """`config`, `warmup` and `cache_key` are goinfer's names on a Model now: a class of before
    that used `config` for itself keeps it (a plain entry sets nothing), and a `warmup` that
    cannot be called as goinfer calls it is refused at registration, not at the worker's start."""
    from goinfer.models.registry import instantiate
    from goinfer.settings import parse_settings

    class OwnConfig(Echo):
        api_path = "/api/own-config"
        config = {"threshold": 3}  # type: ignore[assignment]

    [model] = instantiate([OwnConfig], parse_settings("Models: []")).values()
    assert model.config == {"threshold": 3}
    model.warmup()  # no Warmup entry: nothing to run, and no error on the user's own config

    class NeedsArgument(Echo):
        api_path = "/api/needs-argument"

        def warmup(self, rounds):  # type: ignore[override]
            pass

    with pytest.raises(ModelError, match=re.escape("warmup must accept warmup(self)")):
        check_model_class(NeedsArgument)
