"""The Kubernetes manifests of deploy/k8s: every document validates against the Kubernetes
JSON schemas (strict: no unknown fields), shipped offline by the `kubernetes-validate`
package (a dev dependency); the kustomization lists every manifest but the example Secret;
every long-running process has probes on its health port's /livez and /healthz; the page
and the ingest workers run replicas; secrets reach the processes only as files from the
Secret (CARSEARCH_*_FILE); and every command is one the CLI has. No cluster runs here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fixtures.common import REPO

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = REPO / "deploy" / "k8s"
VERSION = "1.30"


def _docs() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out.extend((path, d) for d in yaml.safe_load_all(path.read_text()) if d)
    return out


def _containers(kind: str | None = None) -> list[tuple[dict, dict]]:
    found = []
    for _, d in _docs():
        if kind and d["kind"] != kind:
            continue
        if d["kind"] in ("Deployment", "Job"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                found.append((d, c))
    return found


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml")
                                        if p.name != "kustomization.yaml"))
def test_every_manifest_validates_against_the_kubernetes_schemas(path: str) -> None:
    docs = [d for d in yaml.safe_load_all((K8S / path).read_text()) if d]
    assert docs
    for d in docs:
        kubernetes_validate.validate(d, VERSION, strict=True)


def test_a_broken_manifest_is_caught() -> None:
    """The validator really checks (offline): a misspelt field fails."""
    d = next(d for _, d in _docs() if d["kind"] == "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(d))
    bad["spec"]["replica"] = bad["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


def test_the_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secrets.example.yaml", "migrate.yaml"}


def test_processes_have_probes_replicas_and_secrets_from_files() -> None:
    deployments = {d["metadata"]["name"]: (d, c) for d, c in _containers("Deployment")}
    assert set(deployments) == {"carsearch-page", "carsearch-ingest", "carsearch-drift",
                                "carsearch-ann-audit", "carsearch-retrain"}
    assert deployments["carsearch-page"][0]["spec"]["replicas"] >= 2
    assert deployments["carsearch-ingest"][0]["spec"]["replicas"] >= 2
    for name, (d, c) in deployments.items():
        assert c["livenessProbe"]["httpGet"]["path"] == "/livez", name
        assert c["readinessProbe"]["httpGet"]["path"] == "/healthz", name
        assert c["args"][-2:] == ["--health-port", "9100"], name
        volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
        assert volumes["secrets"]["secret"]["secretName"] == "carsearch-secrets"
    config = next(d for _, d in _docs() if d["kind"] == "ConfigMap")["data"]
    assert config["CARSEARCH_HEALTH_HOST"] == "0.0.0.0"  # the kubelet probes the pod's address
    assert config["CARSEARCH_MILVUS_URI"].startswith("http://")
    for key, value in config.items():
        assert "PASSWORD" not in key or key.endswith("_FILE"), key
        assert "TOKEN" not in key or key.endswith("_FILE"), key
        if key.endswith("_FILE"):
            assert value.startswith("/run/secrets/carsearch/")
            secret = next(d for _, d in _docs() if d["kind"] == "Secret")
            assert Path(value).name in secret["stringData"]


def test_every_command_is_one_the_cli_has() -> None:
    from typer.testing import CliRunner

    from carsearch.cli import app

    runner = CliRunner()
    for d, c in _containers():
        args = c["args"]
        verb = [a for a in args if not a.startswith("-")][:2]
        res = runner.invoke(app, [*verb[:1], "--help"] if verb[0] in {"serve"} else
                            [*verb, "--help"])
        assert res.exit_code == 0, (d["metadata"]["name"], res.output)
        for flag in (a for a in args if a.startswith("--")):
            assert flag in res.output, (d["metadata"]["name"], flag)


def _pods() -> list[tuple[str, dict]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for _, d in _docs()
            if d["kind"] in ("Deployment", "Job")]


def _dockerfile_user() -> str:
    users = [line.split(None, 1)[1].strip() for line in
             (REPO / "Dockerfile").read_text().splitlines() if line.startswith("USER ")]
    assert users, "the Dockerfile sets no USER: its processes would run as root"
    return users[-1]


def test_every_pod_runs_as_non_root_without_privileges() -> None:
    """Every pod and container: non-root (a numeric uid, the Dockerfile's user), no
    privilege escalation, every capability dropped, a read-only root filesystem with a
    writable /tmp, the runtime's default seccomp profile."""
    pods = _pods()
    assert {name for name, _ in pods} >= {"carsearch-page", "carsearch-ingest",
                                          "carsearch-migrate"}
    uid, _, gid = _dockerfile_user().partition(":")
    assert uid.isdigit() and int(uid) != 0, uid
    for name, spec in pods:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] == int(uid), name
        assert pod["fsGroup"] == int(gid or uid), name  # the PVC and secrets readable
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        tmp = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc.get("runAsUser", pod["runAsUser"]) != 0
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert "add" not in sc["capabilities"], (name, c["name"])
            assert sc.get("privileged", False) is False, (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts.get("/tmp") in tmp, (name, c["name"], "no writable /tmp")
        for v in spec["volumes"]:
            if "secret" in v:  # group-readable: fsGroup 10001 owns the files, not the uid
                assert v["secret"]["defaultMode"] & 0o040, (name, v["name"])
