"""cluster.yaml: Ray's own validation, and the same installation as the README's (the Makefile's)."""
import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments of each `pip install` command, options and all."""
    found = []
    for command in commands:
        words = shlex.split(command)
        if "pip" in words and "install" in words[words.index("pip"):]:
            found.append(words[words.index("install") + 1:])
    return found


def test_cluster_yaml_passes_rays_own_validation():
    """What `ray up` does with it: fill in the provider's defaults, then check it against ray-schema.json."""
    prepared = prepare_config(copy.deepcopy(_cluster()))
    validate_config(prepared)
    nodes = prepared["available_node_types"]
    assert nodes[prepared["head_node_type"]]["resources"] == {"CPU": 0}  # no trial's workers on the head
    (gpu,) = [n for name, n in nodes.items() if name != prepared["head_node_type"]]
    assert gpu["resources"]["GPU"] == 8 and gpu["min_workers"] == 0 < gpu["max_workers"] <= prepared["max_workers"]


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c.update(max_worker=4), jsonschema.ValidationError),  # a misspelt key
    (lambda c: c.update(head_node_type="cpu-head"), ValueError),
    (lambda c: c["available_node_types"]["gpu8"].update(min_workers="two"), jsonschema.ValidationError),
])
def test_the_validation_catches_a_broken_copy(break_it, error):
    broken = _cluster()
    break_it(broken)
    with pytest.raises(error):
        validate_config(prepare_config(broken))


def test_every_node_installs_what_the_readme_installs():
    """The Makefile (which the README's `make demo` and `make test` run) installs torch and torchvision, then the
    project with pip -e. Every node does the same, with torch and torchvision from the range in pyproject.toml
    (which holds the Makefile's local builds) and the project synced from the checkout."""
    makefile = (ROOT / "Makefile").read_text()
    local = dict(re.findall(r"\b(torch|torchvision)==([\d.]+)", makefile))
    assert set(local) == {"torch", "torchvision"}
    pinned = {Requirement(r).name: Requirement(r).specifier
              for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}

    cluster = _cluster()
    prepared = prepare_config(copy.deepcopy(cluster))
    for commands in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        installs = _pip_installs(commands)
        wanted = {Requirement(arg).name: Requirement(arg).specifier
                  for args in installs for arg in args if arg.startswith(("torch", "torchvision"))}
        assert wanted == {name: pinned[name] for name in local}
        assert all(wanted[name].contains(version) for name, version in local.items())
        (editable,) = [args[args.index("-e") + 1] for args in installs if "-e" in args]
        assert cluster["file_mounts"][editable] == "."


def test_the_head_runs_an_mlflow_server_with_a_store_and_an_artifact_root():
    command = " ".join(_cluster()["head_start_ray_commands"])
    assert "mlflow server" in command
    assert re.search(r"--backend-store-uri sqlite:////\S+\.db", command)
    assert re.search(r"--artifacts-destination s3://\S+", command)
