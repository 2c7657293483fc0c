"""One table of settings: where each value comes from, what a mistake says, and what --help lists."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from warmserve.cache.config import CACHE_SETTINGS
from warmserve.deployments import cli
from warmserve.serve.settings import SETTINGS, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_an_option_beats_the_config_file_which_beats_the_environment() -> None:
    env = {"WARMSERVE_CACHE_DIR": "/env/cache", "WARMSERVE_LEASE_TTL": "12", "WARMSERVE_CACHE_BUDGET": "1GiB"}
    args = {"cache_dir": "/file/cache", "lease_ttl": 20, "batch": "1:8", "max_batch_size": 4}
    settings = Settings.load(options={"cache_dir": "/cli/cache", "batch": "2:4"}, args=args, environ=env)
    assert settings.cache.cache_dir == Path("/cli/cache")  # the option
    assert (settings.model.input.min_batch, settings.model.input.max_batch) == (2, 4)
    assert settings.cache.lease_ttl == 20.0  # the file's args
    assert settings.cache.local_budget == 2**30  # the environment
    assert settings.max_batch_size == 4
    assert settings.top_k == 5 and settings.backend == "auto"  # defaults
    assert Settings.load(environ={}).cache.local_budget == 20 * 2**30
    assert Settings.load(args={"cache_budget": "none"}, environ={}).cache.local_budget is None


def test_model_settings_come_from_no_variable() -> None:
    """Every replica of a deployment serves the same model, whatever its node's environment."""
    assert Settings.load(environ={"WARMSERVE_MODEL": "torchvision:vgg11"}).model.model == "torchvision:resnet18"
    assert all(s.env is None for s in SETTINGS if s.key in ("model", "weights", "weights_version", "batch"))


@pytest.mark.parametrize(
    ("where", "given", "named"),
    [
        ("options", {"batch": "8:1"}, "--batch: batch range needs 1 <= MIN <= MAX"),
        ("args", {"batch": "8:1"}, "args.batch: batch range needs"),
        ("args", {"max_batch_size": 0}, "args.max_batch_size: must be positive"),
        ("args", {"backend": "trt"}, "args.backend: must be one of auto, tensorrt"),
        ("args", {"input_shape": "3,a,4"}, "args.input_shape: input shape must be"),
        ("args", {"cache_budget": "lots"}, "args.cache_budget: cannot read 'lots' as a size"),
        ("args", {"batch_wait_timeout_s": -1}, "args.batch_wait_timeout_s: must be zero or more"),
        ("args", {"storage_options": "key=1"}, "args.storage_options: must be a mapping"),
        ("environ", {"WARMSERVE_LEASE_TTL": "0"}, "WARMSERVE_LEASE_TTL: must be positive"),
        ("environ", {"WARMSERVE_SINGLE_FLIGHT": "maybe"}, "WARMSERVE_SINGLE_FLIGHT: use 1/0"),
        ("args", {"max_batch": 8}, "unknown setting(s) ['max_batch'] in the application args (max_batch: did you mean"),
        ("args", {"admin_token": "s3cret"}, "admin_token is a secret, never in a config file: set WARMSERVE_ADMIN"),
        ("args", {"signing_key": "k"}, "signing_key is a secret"),
    ],
)
def test_each_mistake_names_its_option_key_or_variable(where: str, given: dict[str, object], named: str) -> None:
    place = {"options": {}, "args": {}, "environ": {}}
    place[where] = given
    with pytest.raises(ValueError) as e:
        Settings.load(options=place["options"], args=place["args"], environ=place["environ"])  # type: ignore[arg-type]
    assert named in str(e.value)


def test_secrets_come_from_the_environment_and_stay_out_of_logs() -> None:
    env = {"WARMSERVE_ADMIN_TOKEN": "t0ken", "WARMSERVE_SIGNING_KEY": "k3y"}
    settings = Settings.load(environ=env)
    assert settings.admin_token == "t0ken" and settings.cache.signing_key == b"k3y"
    assert "t0ken" not in repr(settings) and "k3y" not in repr(settings.cache)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        old = Settings.load(environ={"WARMSERVE_CACHE_KEY": "old"})
    assert old.cache.signing_key == b"old" and "WARMSERVE_SIGNING_KEY" in str(seen[0].message)


def test_the_embedded_config_args_are_settings() -> None:
    config = yaml.safe_load((ROOT / "deployments" / "config.yaml").read_text())
    Settings.load(args=config["applications"][0]["args"], environ={})


@pytest.mark.parametrize("command", ["build", "run"])
def test_help_lists_every_setting_with_its_default_and_variable(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in SETTINGS:
        if command in s.commands:
            assert s.option in text, s.key
            assert " ".join(s.describe().split()) in text, s.key
        if s.env and (command in s.commands or not s.commands):
            assert s.env in text, s.env  # an option's variable, or in the epilog an environment-only setting


def test_cache_commands_take_where_the_cache_is(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["cache", "ls", "--help"])
    text = capsys.readouterr().out
    assert all(s.option in text for s in CACHE_SETTINGS if "cache" in s.commands)
