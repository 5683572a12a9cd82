"""infra/cluster/Dockerfile and requirements.lock, checked without Docker: the file is parsed
(instructions, ARG defaults, line continuations) and its base image, user, install steps and
entrypoint are checked against pyproject, the lock and the manifests; the lock against pyproject
and against the Requires-Dist of the packages installed here. Mutated files must fail."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from advflow.infra.cluster import lock, names, validate

DOCKERFILE = names.CLUSTER_DIR / "Dockerfile"
TAG = re.compile(r"(?P<torch>\d+\.\d+\.\d+)-cuda(?P<cuda>\d+\.\d+)-cudnn(?P<cudnn>\d+)-devel")


def parse(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, `\\` continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction is not part of it
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, args = full.partition(" ")
        out.append((word.upper(), " ".join(args.split())))
    assert not pending, "the file ends inside a continued line"
    return out


def arg_defaults(instructions) -> dict[str, str]:
    """ARGs declared before the first FROM with their defaults (what FROM can use)."""
    args = {}
    for word, rest in instructions:
        if word == "FROM":
            break
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def base_image(instructions, overrides: dict[str, str] | None = None) -> tuple[str, str]:
    args = {**arg_defaults(instructions), **(overrides or {})}
    (image,) = [rest.split()[0] for word, rest in instructions if word == "FROM"]
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
    repo, _, tag = resolved.partition(":")
    return repo, tag


def pyproject() -> dict:
    return tomllib.loads((names.REPO / "pyproject.toml").read_text())["project"]


def torch_spec():
    (req,) = [Requirement(r) for r in pyproject()["dependencies"] if Requirement(r).name == "torch"]
    return req.specifier


def check_dockerfile(text: str) -> None:
    """Every rule this file must keep; AssertionError names the broken one."""
    ins = parse(text)
    repo, tag = base_image(ins)
    assert repo == "pytorch/pytorch", f"base image {repo}"
    match = TAG.fullmatch(tag)
    assert match, f"tag {tag!r} is not <torch>-cuda<x.y>-cudnn<n>-devel"
    assert torch_spec().contains(match["torch"]), f"torch {match['torch']} is outside pyproject's {torch_spec()}"
    users = [rest for word, rest in ins if word == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1] not in ("root", "0") and not users[-1].startswith(("0:", "root:")), f"USER {users[-1]}"
    assert users[-1] == str(names.UID), f"USER {users[-1]} is not the uid the manifests run as ({names.UID})"
    assert any(f"--uid {names.UID}" in rest for word, rest in ins if word == "RUN"), "no user with that uid"
    runs = " && ".join(rest for word, rest in ins if word == "RUN")
    steps = ["pip install --no-deps -r infra/cluster/requirements.lock", "pip install --no-deps .", "pip check"]
    at = [runs.find(step) for step in steps]
    assert all(i >= 0 for i in at) and at == sorted(at), f"install steps {steps} missing or out of order"
    (workdir,) = [rest for word, rest in ins if word == "WORKDIR"]
    assert workdir == names.WORKDIR
    for word, rest in ins:
        if word == "COPY":
            for source in rest.split()[:-1]:
                assert (names.REPO / source).exists(), f"COPY {source}: not in the repo"
    (entry,) = [rest for word, rest in ins if word == "ENTRYPOINT"]
    path = entry.strip('[]" ').split('"')[0]
    assert path.startswith(workdir + "/"), f"ENTRYPOINT {path} is not in {workdir}"
    local = names.REPO / path[len(workdir) + 1:]
    assert local.is_file() and os.access(local, os.X_OK), f"ENTRYPOINT {path}: {local} missing or not executable"


def test_the_dockerfile_keeps_its_rules():
    check_dockerfile(DOCKERFILE.read_text())


def test_the_base_tag_targets_pyprojects_torch_and_a_cuda_devel_image():
    repo, tag = base_image(parse(DOCKERFILE.read_text()))
    assert TAG.fullmatch(tag)["torch"] == arg_defaults(parse(DOCKERFILE.read_text()))["TORCH_VERSION"]
    # another torch through --build-arg: in range or refused
    assert torch_spec().contains(TAG.fullmatch(base_image(parse(DOCKERFILE.read_text()), {"TORCH_VERSION": "2.14.1"})[1])["torch"])


@pytest.mark.parametrize("old, new, message", [
    ("USER 10001", "USER root", "USER root"),
    ("USER 10001", "USER 0", "USER 0"),
    ("USER 10001\n", "", "no USER"),
    ("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.3.1", "outside pyproject"),
    ("cudnn${CUDNN_VERSION}-devel", "cudnn${CUDNN_VERSION}-runtime", "devel"),
    ("FROM pytorch/pytorch:", "FROM nvidia/cuda:", "base image"),
    ("    && pip check \\\n", "", "install steps"),
    ("entrypoint.sh", "start.sh", "ENTRYPOINT"),
    ("COPY jobs jobs", "COPY job jobs", "COPY job"),
], ids=["root", "uid0", "no-user", "old-torch", "runtime", "other-base", "no-pip-check", "entrypoint", "copy"])
def test_a_mutated_dockerfile_is_caught(old, new, message):
    text = DOCKERFILE.read_text()
    assert old in text
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_dockerfile(text.replace(old, new))


def test_the_parser_joins_continuations_and_skips_comments():
    ins = parse("ARG A=1\n# c\nFROM x:${A}\nRUN a \\\n  # inner\n    && b\nUSER 5\n")
    assert ins == [("ARG", "A=1"), ("FROM", "x:${A}"), ("RUN", "a && b"), ("USER", "5")]
    assert base_image(ins) == ("x", "1")


@pytest.mark.integration
def test_the_entrypoint_is_executable_in_git_too():
    # the image gets the mode git checks out, not this working tree's
    mode = subprocess.run(["git", "ls-files", "-s", "infra/cluster/entrypoint.sh"], cwd=names.REPO,
                          capture_output=True, text=True, check=True).stdout.split()[:1]
    assert mode in (["100755"], []), mode  # [] until committed


# ------------------------------------------------------------------------- the lock


def pins(text: str | None = None) -> dict[str, str]:
    out = {}
    for line in (names.LOCK.read_text() if text is None else text).splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and " " not in line, f"{line!r} is not an exact pin"
            out[canonicalize_name(name)] = version
    return out


def check_lock_against_pyproject(locked: dict[str, str]) -> None:
    for req in lock.root_requirements():
        name = canonicalize_name(req.name)
        if lock.excluded(name):
            assert name not in locked, f"{name} is the base image's, not the lock's"
            continue
        assert name in locked, f"{req} (pyproject) is not in requirements.lock"
        assert req.specifier.contains(locked[name], prereleases=True), f"{name}=={locked[name]} breaks {req}"
    assert not [n for n in locked if lock.excluded(n)]


def check_lock_closed(locked: dict[str, str]) -> int:
    """Each locked package installed here at the locked version: every requirement it declares (for
    the extras anything in the lock asks of it) is in the lock at a version that satisfies it."""
    extras: dict[str, set[str]] = {}
    for req in lock.root_requirements():
        extras.setdefault(canonicalize_name(req.name), set()).update(req.extras)
    checked = 0
    for _ in range(2):  # extras asked by locked packages, then the check with them
        for name, version in locked.items():
            try:
                if metadata.version(name) != version:
                    continue
            except metadata.PackageNotFoundError:
                continue
            for req in lock.requirements_of(name, extras.get(name, set())):
                dep = canonicalize_name(req.name)
                extras.setdefault(dep, set()).update(req.extras)
                if lock.excluded(dep):
                    continue
                assert dep in locked, f"{name}=={version} needs {req}, which the lock lacks"
                assert req.specifier.contains(locked[dep], prereleases=True), \
                    f"{name}=={version} needs {req}, the lock has {dep}=={locked[dep]}"
                checked += 1
    return checked


def test_every_lock_pin_satisfies_pyproject_and_every_dependency_is_locked():
    check_lock_against_pyproject(pins())


@pytest.mark.integration  # end-to-end: reads the installed metadata of every locked package (seconds)
def test_the_lock_is_closed_and_consistent_with_the_installed_metadata():
    assert check_lock_closed(pins()) > 100  # most of the lock is installed here: the check is not vacuous


@pytest.mark.parametrize("mutate, message", [
    (lambda text: text.replace("\nbotocore==", "\nbotocore==1.0.0\n#"), "botocore"),
    (lambda text: re.sub(r"\njmespath==[^\n]*", "", text), "lacks"),
    (lambda text: text.replace("\nray==", "\nray==2.0.0\n#"), "ray==2.0.0 breaks"),
    (lambda text: re.sub(r"\nmlflow==[^\n]*", "", text), "mlflow"),
    (lambda text: text + "torch==2.13.0\n", "base image"),
], ids=["botocore-outside-window", "dependency-missing", "outside-pyproject", "root-missing", "torch-locked"])
def test_a_mutated_lock_is_caught(mutate, message):
    text = mutate(names.LOCK.read_text())
    with pytest.raises(AssertionError, match=re.escape(message)):
        locked = pins(text)
        check_lock_against_pyproject(locked)
        check_lock_closed(locked)


def test_the_manifests_ray_is_the_images_ray():
    ray = pins()["ray"]
    assert names.locked_version("ray") == ray
    for docs in validate.committed().values():
        for obj in docs:
            if obj["kind"] in ("RayCluster", "RayJob"):
                assert validate.ray_cluster_spec(obj)["rayVersion"] == ray
    assert Version(ray) >= Version("2.52")  # Ray token authentication exists from 2.52 on
