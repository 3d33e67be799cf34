"""The log shipper's rsyslog configuration (orchestrator.logship). That rsyslog accepts it is
checked in the image (tests/integration/test_logging_image.py)."""

from __future__ import annotations

import re

import pytest

from orchestrator.logship import Target, config_hash, shipper_config

SHOP = Target("shop", "127.0.0.1", 31801)
DEV = Target("dev-2", "10.0.0.7", 31803)


def actions(config: str) -> list[str]:
    return re.findall(r"action\(type=\"omrelp\".*?\)\n", config, re.S)


def test_only_lines_of_this_host_go_out() -> None:
    config = shipper_config("local", [SHOP])
    assert 'if $!attrs!ORCH_HOST != "local" then stop' in config
    assert config.index("ORCH_HOST") < config.index('type="omrelp"')
    assert 'action(type="mmjsonparse" cookie="")' in config
    assert 'if $parsesuccess != "OK" then stop' in config


def test_docker_logs_are_read_with_their_file_name_and_rotations() -> None:
    config = shipper_config("local", [SHOP])
    imfile = re.search(r"input\(type=\"imfile\"(.*?)\)\n", config, re.S)
    assert imfile is not None
    assert 'file="/docker/containers/*/*-json.log*"' in imfile[1]  # the rotated files too
    assert 'addMetadata="on"' in imfile[1] and 'module(load="imfile" mode="inotify")' in config
    size = re.search(r'maxMessageSize="(\d+)k"', config)
    assert size and int(size[1]) >= 128
    assert 'workDirectory="/var/spool/orch-logship"' in config


def test_each_environment_has_its_action_and_queue() -> None:
    config = shipper_config("h1", [SHOP, DEV])
    found = actions(config)
    assert len(found) == 2
    for target, action in zip(sorted([SHOP, DEV], key=lambda t: t.env), found, strict=True):
        assert f'target="{target.address}" port="{target.syslog_port}"' in action
        assert f'queue.filename="ship-{target.env}"' in action
        assert 'queue.saveOnShutdown="on"' in action and 'action.resumeRetryCount="-1"' in action
        assert re.search(r'queue.maxDiskSpace="\d+[mg]"', action)
        before = config[:config.index(action)]
        assert before.rstrip().endswith(f'if $!attrs!ORCH_ENV == "{target.env}" then {{')
    assert config.rstrip().endswith("  }\n  stop\n}")  # lines of other environments reach no action


def test_the_message_is_rfc5424_with_the_file_and_the_docker_line() -> None:
    config = shipper_config("h1", [SHOP])
    template = re.search(r'template\(name="orch-ship" type="list"\) \{(.*?)\n\}', config, re.S)
    assert template is not None
    body = template[1]
    assert 'constant(value=">1 ")' in body  # RFC 5424 version
    assert 'property(name="$!metadata!filename" format="json")' in body
    assert 'constant(value="\\",\\"entry\\":")' in body and 'property(name="msg")' in body
    assert body.index("filename") < body.index('name="msg"')
    assert 'template="orch-ship"' in actions(config)[0]


def test_no_targets_ships_nothing() -> None:
    config = shipper_config("h1", [])
    assert actions(config) == []
    assert "imfile" in config


@pytest.mark.parametrize("host", ["", "H1", "h_1", "-h", "h-", "h 1", 'h"1', "h1\n", "a" * 64, "é"])
def test_host_names_are_checked(host: str) -> None:
    with pytest.raises(ValueError):
        shipper_config(host, [SHOP])


@pytest.mark.parametrize("target", [
    Target("Shop", "127.0.0.1", 1), Target('a"b', "127.0.0.1", 1), Target("a}", "127.0.0.1", 1),
    Target("shop", '127.0.0.1" port="1', 1), Target("shop", "", 1), Target("shop", "a b", 1),
    Target("shop", "[::1]", 1), Target("shop", "127.0.0.1", 0), Target("shop", "127.0.0.1", 65536),
    Target("shop", "127.0.0.1", True),
])
def test_targets_are_checked(target: Target) -> None:
    with pytest.raises(ValueError):
        shipper_config("h1", [target])


def test_names_of_any_valid_environment_are_safe() -> None:
    names = ["a", "shop", "dev-2", "0x", "a" * 63, "a-b-c-d"]
    config = shipper_config("h-1", [Target(n, "::1", 1000 + i) for i, n in enumerate(names)] +
                            [Target("v6", "fd00::1", 2000), Target("dns", "logs.example.internal", 2001)])
    assert len(actions(config)) == len(names) + 2
    assert len(set(re.findall(r'queue.filename="([^"]+)"', config))) == len(names) + 3  # + the main queue


def test_one_target_per_environment() -> None:
    with pytest.raises(ValueError):
        shipper_config("h1", [SHOP, Target("shop", "127.0.0.2", 31901)])


def test_the_hash_follows_the_text() -> None:
    one, two = shipper_config("h1", [SHOP]), shipper_config("h1", [SHOP, DEV])
    assert config_hash(one) == config_hash(shipper_config("h1", [SHOP]))
    assert config_hash(one) != config_hash(two)
    assert shipper_config("h1", [SHOP, DEV]) == shipper_config("h1", [DEV, SHOP])  # order does not matter
    assert re.fullmatch(r"[0-9a-f]{12,16}", config_hash(one))
