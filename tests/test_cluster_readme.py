"""Every command in infra/cluster/README.md's code blocks is exercised or checked against what it
names: `advflow cluster manifest` lines are run (the committed set must come out unchanged), files
given to `kubectl apply` exist and validate, Secrets carry the keys the manifests read, objects
named by `kubectl get/logs/port-forward/rollout` exist, `docker build` args are the Dockerfile's
ARGs, job command lines run scripts and configs the image holds, the Prometheus/Grafana release,
port-forwards and dashboard imports match the manifests' settings. A line no rule knows fails."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml
from packaging.version import Version

from advflow.infra.cluster import kuberay, lock, manifest, monitoring, names, validate

# end-to-end: replays every README command through the manifest generator and validators (seconds)
pytestmark = pytest.mark.integration

README = names.CLUSTER_DIR / "README.md"
ENV = {"REGISTRY": "registry.example/team", "BUCKET": "my-bucket", "AWS_ACCESS_KEY_ID": "AKIA",
       "AWS_SECRET_ACCESS_KEY": "s", "HOME": "/home/u"}


def commands() -> list[str]:
    out, inside = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            continue
        if inside and line.strip() and not line.startswith("#"):
            out.append(line.strip())
    return out


def expand(line: str) -> str:
    return re.sub(r"\$(\w+)", lambda m: ENV.get(m.group(1), m.group(0)), line)


class Deploy:
    """What the README's commands produce and name, followed line by line."""

    def __init__(self, tmp_path, capsys, monkeypatch):
        self.tmp, self.capsys = tmp_path, capsys
        self.dirs: dict[str, object] = {}
        self.secrets: dict[str, set[str]] = {}
        self.prometheus: dict[str, str] = {}  # the kube-prometheus-stack release: name, namespace
        self.ports: dict[str, int] = {}  # local port of each port-forwarded Service
        self.copied: str | None = None  # where Ray's Grafana dashboards were copied to
        monkeypatch.chdir(names.REPO)

    def objects(self) -> list[dict]:
        return [o for d in self.dirs.values() for p in sorted(d.glob("*.yaml")) for o in yaml.safe_load_all(p.read_text())]

    def find(self, kind: str, name: str) -> dict:
        found = [o for o in self.objects() if o["kind"].lower() == kind.lower() and o["metadata"]["name"] == name]
        assert found, f"no {kind} {name} in the generated manifests"
        return found[0]

    def manifest(self, argv: list[str]) -> None:
        out = argv[argv.index("--out-dir") + 1]
        target = self.tmp / out.replace("/", "_")
        argv[argv.index("--out-dir") + 1] = str(target)
        assert manifest.main(argv) == 0, self.capsys.readouterr().err
        self.dirs[out] = target
        if out == "infra/cluster/kuberay":
            for kind in manifest.KINDS:
                assert (target / f"{kind}.yaml").read_text() == (validate.KUBERAY / f"{kind}.yaml").read_text()
        if "--image" in argv:
            images = {c["image"] for o in self.objects() for _, pod in validate.pod_specs(o)
                      for c in pod["containers"] if o["metadata"]["namespace"] == "advflow" and c["image"] != names.POSTGRES_IMAGE}
            assert argv[argv.index("--image") + 1] in images

    def file(self, path: str) -> list[dict]:
        folder, _, name = path.rpartition("/")
        assert folder in self.dirs, f"{path}: no README command generates {folder}/"
        return list(yaml.safe_load_all((self.dirs[folder] / name).read_text()))

    def apply(self, paths: list[str]) -> None:
        for path in paths:
            for obj in self.file(path):
                if obj["kind"] in ("RayCluster", "RayJob"):
                    try:
                        validate.validate_crd(obj)
                    except validate.CRDsMissing:
                        pass  # test_cluster_manifests.py says so; the other checks still run
                    validate.check_ray_cluster(obj, **self.sizes(obj))
                elif obj["kind"] == "PodMonitor":
                    assert self.prometheus, f"{path}: PodMonitor applied before a README line installs the Prometheus operator"
                    clusters = [o for o in self.objects() if o["kind"] in ("RayCluster", "RayJob")]
                    validate.check_pod_monitor(obj, clusters)
                    assert obj["metadata"]["labels"].get("release") == self.prometheus["release"], \
                        f"{path}: the release label is not the Helm release {self.prometheus['release']!r}"
                else:
                    validate.validate_core(obj)
                validate.check_non_root(obj)
                validate.check_secret_refs(obj)
                for _, pod in validate.pod_specs(obj):
                    for c in pod["containers"]:
                        for ref in c.get("env", []):
                            secret = ref.get("valueFrom", {}).get("secretKeyRef")
                            if secret:  # created by an earlier README line, with that key
                                assert ref and secret["key"] in self.secrets.get(secret["name"], set()), secret

    @staticmethod
    def sizes(obj: dict) -> dict:
        group = validate.ray_cluster_spec(obj)["workerGroupSpecs"][0]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        return {"workers": group["replicas"], "cpus": int(limits["cpu"])}


HELM_REPOS = {"kuberay": "https://ray-project.github.io/kuberay-helm/",
              "prometheus-community": "https://prometheus-community.github.io/helm-charts"}
# Where Ray's dashboard writes its Grafana dashboards (ray/dashboard/modules/metrics/metrics_head.py).
RAY_GRAFANA_DASHBOARDS = "/tmp/ray/session_latest/metrics/grafana/dashboards"


def stack_services(release: str) -> dict[str, int]:
    """The kube-prometheus-stack chart's Services of Grafana and Prometheus: name -> port."""
    return {f"{release}-grafana": 80, f"{release}-kube-prometheus-prometheus": 9090}


def check_prometheus_stack(release: dict[str, str], values_path: str) -> None:
    """The Helm release is the one the manifests' defaults name (Services in RAY_*_HOST, the
    PodMonitors' release label), and its values let Ray's dashboard embed Grafana."""
    defaults = monitoring.Monitoring()
    assert release["release"] == defaults.release, f"release {release['release']} != the PodMonitors' {defaults.release}"
    services = stack_services(release["release"])
    hosts = {f"http://{svc}.{release['namespace']}.svc:{port}" for svc, port in services.items()}
    assert {defaults.prometheus_url, defaults.grafana_url} == hosts, (hosts, defaults)
    values = yaml.safe_load((names.REPO / values_path).read_text())
    assert values["grafana"]["grafana.ini"]["security"]["allow_embedding"] is True, "Ray's Metrics view embeds Grafana"
    assert values["prometheus"]["prometheusSpec"]["podMonitorNamespaceSelector"] == {}


def check_stack_port_forward(d: "Deploy", namespace: str, service: str, ports: list[str]) -> None:
    assert d.prometheus and namespace == d.prometheus["namespace"], f"no README line installs anything in {namespace}"
    services = stack_services(d.prometheus["release"])
    assert service in services, f"{service}: not a Service of the kube-prometheus-stack release ({sorted(services)})"
    assert int(ports[1]) == services[service], f"{service} listens on {services[service]}, not {ports[1]}"
    d.ports[service] = int(ports[0])
    if service.endswith("-grafana"):  # the browser loads Ray's embedded panels from there
        heads = [c for o in d.objects() if o["kind"] in ("RayCluster", "RayJob")
                 for c in validate.ray_cluster_spec(o)["headGroupSpec"]["template"]["spec"]["containers"]]
        iframe = {e["value"] for c in heads for e in c["env"] if e["name"] == "RAY_GRAFANA_IFRAME_HOST"}
        assert heads and iframe == {f"http://127.0.0.1:{ports[0]}"}, f"RAY_GRAFANA_IFRAME_HOST {iframe} != this port-forward"


def check_dashboard_import(d: "Deploy", line: str) -> None:
    """`for f in GLOBS; do jq '{dashboard: ., overwrite: true}' $f | curl ... URL/api/dashboards/db; done`."""
    match = re.fullmatch(r"for f in (?P<globs>[^;]+); do jq '\{dashboard: \., overwrite: true\}' \$f \| "
                         r"curl -sf -u admin:\$GRAFANA_PASSWORD -H 'Content-Type: application/json' --data-binary @- "
                         r"http://127\.0\.0\.1:(?P<port>\d+)/api/dashboards/db; done", line)
    assert match, f"not the import loop: {line}"
    grafana = [port for svc, port in d.ports.items() if svc.endswith("-grafana")]
    assert grafana == [int(match["port"])], f"Grafana is port-forwarded to {grafana}, not {match['port']}"
    for glob in match["globs"].split():
        folder, _, pattern = glob.rpartition("/")
        if folder == d.copied:
            continue  # Ray's, copied from the head pod above
        files = sorted((names.REPO / folder).glob(pattern))
        assert files, f"{glob}: no such files"
        for path in files:
            dashboard = json.loads(path.read_text())
            assert dashboard["uid"] and "id" not in dashboard, f"{path}: not an importable dashboard"
    assert any(g.startswith("dashboards/grafana/") for g in match["globs"].split()), "advflow's dashboards are not imported"


def check_job_line(words: list[str]) -> None:
    """`ray job submit ... -- bash -c 'cd WORKDIR && exec python SCRIPT --config CONFIG ...'`."""
    entry = words[words.index("--") + 1:]
    assert entry[:2] == ["bash", "-c"] and len(entry) == 3, entry
    script = shlex.split(entry[2])
    assert script[:4] == ["cd", names.WORKDIR, "&&", "exec"] and script[4] == "python", script
    assert (names.REPO / script[5]).is_file(), script[5]
    if "--config" in script:
        assert (names.REPO / script[script.index("--config") + 1]).is_file()


def test_every_readme_command_is_checked(tmp_path, capsys, monkeypatch):
    d = Deploy(tmp_path, capsys, monkeypatch)
    dockerfile = (names.CLUSTER_DIR / "Dockerfile").read_text()
    build_args = set(re.findall(r"^ARG (\w+)=", dockerfile, flags=re.M))
    tag = None
    seen = set()
    for raw in commands():
        line = expand(raw)
        words = shlex.split(re.sub(r"\$\([^)]*\)", "SUBST", line))
        head = " ".join(words[:3])
        if words[:3] == ["advflow", "cluster", "manifest"]:
            d.manifest(words[3:])
        elif words[:2] == ["docker", "build"]:
            args = dict(w.split("=", 1) for w in words[words.index("--build-arg") + 1::2] if "=" in w)
            got = [words[i + 1].split("=")[0] for i, w in enumerate(words) if w == "--build-arg"]
            assert set(got) <= build_args, f"--build-arg {got} vs the Dockerfile's ARGs {build_args}"
            assert words[words.index("-f") + 1] == "infra/cluster/Dockerfile" and words[-1] == "."
            assert f"ARG TORCH_VERSION={args.get('TORCH_VERSION')}" in dockerfile
            tag = words[words.index("-t") + 1]
        elif words[:2] in (["docker", "push"], ["docker", "run"]):
            assert words[-1] == tag, f"{line}: not the image built above ({tag})"
        elif line == ".venv/bin/python -m pip check && .venv/bin/python -m advflow.infra.cluster.lock":
            assert lock.main(["--out", str(tmp_path / "lock")]) == 0
            locked = (tmp_path / "lock").read_text()
            assert all(f"\n{r.name}==" in locked for r in lock.root_requirements() if not lock.excluded(r.name))
        elif words[:3] == ["helm", "repo", "add"]:
            assert HELM_REPOS.get(words[3]) == words[4], f"helm repo {words[3]} {words[4]}"
        elif words[:2] == ["helm", "install"] and words[3] == "kuberay/kuberay-operator":
            assert Version(words[words.index("--version") + 1]) >= Version("1.5.1")  # authOptions
        elif words[:2] == ["helm", "install"] and words[3] == "prometheus-community/kube-prometheus-stack":
            d.prometheus = {"release": words[2], "namespace": words[words.index("--namespace") + 1]}
            check_prometheus_stack(d.prometheus, words[words.index("-f") + 1])
        elif words[:3] == ["kubectl", "create", "namespace"]:
            assert words[3] == "advflow"
        elif words[:2] == ["kubectl", "-n"] and words[3:6] == ["create", "secret", "generic"]:
            d.secrets[words[6]] = {w.split("=", 2)[1] for w in words[7:] if w.startswith("--from-literal=")}
        elif words[:2] == ["kubectl", "apply"] or words[:2] == ["kubectl", "delete"] and words[2] == "-f":
            d.apply([words[i + 1] for i, w in enumerate(words) if w == "-f"])
        elif words[:2] == ["kubectl", "-n"] and words[3:5] == ["rollout", "status"]:
            d.find(*words[5].split("/"))
        elif words[:2] == ["kubectl", "-n"] and words[3] in ("get", "delete") and words[4] == "rayjob":
            d.find("RayJob", words[5])
        elif words[:2] == ["kubectl", "-n"] and words[3:5] == ["logs", "-f"]:
            d.find("RayJob", words[5].removeprefix("job/"))  # KubeRay names the submitter Job after it
        elif words[:2] == ["kubectl", "-n"] and words[3] == "port-forward" and words[2] != "advflow":
            check_stack_port_forward(d, words[2], words[4].removeprefix("svc/"), words[5].split(":"))
        elif words[:2] == ["kubectl", "-n"] and words[3] == "cp":
            source, d.copied = words[4], words[5]
            assert source.split(":", 1)[1] == RAY_GRAFANA_DASHBOARDS, f"Ray writes its dashboards to {RAY_GRAFANA_DASHBOARDS}"
            selector = re.search(r"get pod -l (\S+)", line).group(1)
            heads = [labels for o in d.objects() if o["kind"] in ("RayCluster", "RayJob")
                     for _, labels, _ in validate.ray_pods(o) if labels["ray.io/node-type"] == "head"]
            wanted = dict(kv.split("=", 1) for kv in selector.split(","))
            assert heads and all(wanted.items() <= h.items() for h in heads), f"-l {selector} selects no head pod"
        elif words[:3] == ["for", "f", "in"] and "/api/dashboards/db" in line:
            check_dashboard_import(d, line)
        elif words[:2] == ["kubectl", "-n"] and words[3] == "port-forward":
            service, ports = words[4].removeprefix("svc/"), words[5].split(":")
            if service == "SUBST-head-svc":  # $(kubectl get rayjob NAME -o jsonpath='{.status.rayClusterName}')
                job = re.search(r"get rayjob (\S+) -o jsonpath='\{\.status\.rayClusterName\}'", line).group(1)
                d.find("RayJob", job)
                assert "rayClusterName" in str(validate.crd_schema("RayJob")["properties"]["status"]) \
                    if validate.CRDS.is_dir() else True
            elif service.endswith("-head-svc"):  # KubeRay's head Service of a RayCluster
                d.find("RayCluster", service.removesuffix("-head-svc"))
                assert ports == ["8265", "8265"]
            else:
                svc = d.find("Service", service)
                assert int(ports[1]) == svc["spec"]["ports"][0]["port"]
                host = f"localhost:{ports[0]}"
                allowed = " ".join(d.find("Deployment", service)["spec"]["template"]["spec"]["containers"][0]["command"])
                assert host in allowed, f"MLflow would refuse Host {host}"
        elif words[:1] == ["export"] and words[1].startswith("GRAFANA_PASSWORD="):
            release, namespace = d.prometheus["release"], d.prometheus["namespace"]
            assert f"kubectl -n {namespace} get secret {release}-grafana -o jsonpath='{{.data.admin-password}}'" in line
        elif words[:1] == ["export"]:
            assert "RAY_AUTH_MODE=token" in words
            assert "get secret advflow-ray-token -o jsonpath='{.data.auth_token}'" in line
        elif words[:3] == ["ray", "job", "submit"] or words[:4] == ["RAY_AUTH_MODE=token", "ray", "job", "submit"]:
            check_job_line(words)
        elif words[:3] == ["aws", "s3", "cp"]:
            sweep = d.file("deploy/rayjob-sweep.yaml")[0]
            init = validate.ray_cluster_spec(sweep)["workerGroupSpecs"][0]["template"]["spec"]["initContainers"][0]
            assert words[4] == init["command"][-2] + "/", (words[4], init["command"])
            space = (names.REPO / manifest.DEFAULTS["space"]).read_text()
            assert f"{kuberay.FID_DIR}/{words[3]}" in space
        elif words[:2] == ["ray", "get-auth-token"]:
            assert words[2] == "--generate"
        elif words[:3] == ["aws", "ssm", "put-parameter"]:
            aws = yaml.safe_load((names.CLUSTER_DIR / "aws.yaml").read_text())
            assert any(f"--parameter {words[4]}" in c for c in aws["setup_commands"])
            assert words[-1] == "file:///home/u/.ray/auth_token"
        elif words[:2] in (["ray", "up"], ["ray", "dashboard"]):
            assert words[2] == "infra/cluster/aws.yaml"
        else:
            pytest.fail(f"infra/cluster/README.md: no check for the command {raw!r}")
        seen.add(head)
    # the Secrets the README creates are exactly those the manifests read
    assert d.secrets == validate.SECRETS
    assert len(seen) > 15


@pytest.mark.parametrize("old, new, message", [
    ("rollout status deployment/advflow-mlflow", "rollout status deployment/mlflow", "no deployment mlflow"),
    ("--build-arg CUDA_VERSION=12.8", "--build-arg CUDA=12.8", "the Dockerfile's ARGs"),
    ("--from-literal=OPTUNA_DB_PASSWORD", "--from-literal=OPTUNA_PASSWORD", "OPTUNA_DB_PASSWORD"),
    ("kubectl apply -f deploy/mlflow.yaml", "kubectl apply -f deploy/tracking.yaml", "tracking.yaml"),
    ("ray dashboard infra/cluster/aws.yaml", "ray dashboard infra/cluster/gcp.yaml", "gcp.yaml"),
    ("kubectl create namespace advflow", "kubectl create ns advflow", "no check for the command"),
    ("port-forward svc/advflow-mlflow 5000:5000", "port-forward svc/advflow-mlflow 8080:5000", "refuse Host localhost:8080"),
    ("aws s3 cp VIRTUAL_imagenet256_labeled.npz", "aws s3 cp VIRTUAL_imagenet64_labeled.npz", "imagenet64"),
    ("port-forward svc/prometheus-grafana 3000:80", "port-forward svc/prometheus-grafana 3001:80", "RAY_GRAFANA_IFRAME_HOST"),
    ("port-forward svc/prometheus-kube-prometheus-prometheus 9090:9090",
     "port-forward svc/prometheus-prometheus 9090:9090", "not a Service of the kube-prometheus-stack"),
    ("helm install prometheus prometheus-community", "helm install monitoring prometheus-community", "release monitoring"),
    ("-f infra/cluster/prometheus-values.yaml", "-f infra/cluster/grafana-values.yaml", "grafana-values.yaml"),
    ("for f in ray-dashboards/*.json dashboards/grafana/*.json", "for f in ray-dashboards/*.json dashboards/*.json",
     "dashboards/*.json: no such files"),
    ("for f in ray-dashboards/*.json dashboards/grafana/*.json", "for f in ray-dashboards/*.json",
     "advflow's dashboards are not imported"),
    ("/metrics/grafana/dashboards ray-dashboards", "/metrics/dashboards ray-dashboards", "Ray writes its dashboards"),
], ids=["object", "build-arg", "secret-key", "file", "aws-file", "unknown", "mlflow-host", "fid-file",
        "grafana-port", "prometheus-service", "helm-release", "values-file", "dashboards-glob", "no-advflow-dashboards",
        "ray-dashboards-path"])
def test_a_wrong_readme_command_fails(old, new, message, tmp_path, capsys, monkeypatch):
    import sys

    original = README.read_text()
    assert old in original, old
    monkeypatch.setattr(sys.modules[__name__], "README", tmp_path / "README.md")
    (tmp_path / "README.md").write_text(original.replace(old, new))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises((AssertionError, pytest.fail.Exception, FileNotFoundError)) as err:
        test_every_readme_command_is_checked(work, capsys, monkeypatch)
    assert message in str(err.value), str(err.value)[:300]
