"""The deployment files agree with each other, with the service contract and with the server.

Docker does not run on the build machines, so these tests read the Dockerfile, compose
file, Prometheus/Grafana configuration and Kubernetes manifests and check what an
operator would otherwise find out at ``docker compose up``: the same service name, port,
paths, user id, state folder and metric names everywhere. The health-check commands are
run for real against a local HTTP server, and ``promtool`` (when installed) validates and
unit-tests the Prometheus rules and every dashboard query.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from testsupport.deploy import (
    ALL_QUERIES,
    DEPLOY,
    K8S,
    PORT,
    PROMTOOL,
    ROOT,
    TARGET_LABELS,
    Dockerfile,
    HealthHandler,
    Query,
    Reset,
    as_promql,
    compose_env,
    contract_metrics,
    contract_series,
    dashboard,
    dashboard_queries,
    docker_ignores,
    duration_seconds,
    exec_form,
    grouping_labels,
    health_commands,
    k8s_env,
    load_compose,
    load_manifests,
    matcher_labels,
    metric_names,
    nginx_directive,
    parse_dockerfile,
    pod_spec,
    recorded_names,
    run_check,
    useradd_uid,
    volume_mounts,
)

NEEDS_PROMTOOL = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not on PATH (Debian: apt-get install --no-install-recommends prometheus)",
)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile(parse_dockerfile((ROOT / "Dockerfile").read_text()))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(ROOT / "docker-compose.yml")


@pytest.fixture(scope="module")
def branchy(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]["branchy"]


def _service_module(name: str) -> Any:
    """``service.<name>``, skipping while the service engineer has not written it; once
    the file exists, an import error fails the test instead of hiding behind a skip."""
    if not (ROOT / "service" / f"{name}.py").is_file():
        pytest.skip(f"service/{name}.py does not exist yet")
    return importlib.import_module(f"service.{name}")


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    return load_manifests()


@pytest.fixture(scope="module")
def container(k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    (c,) = [c for c in pod_spec(k8s)["containers"] if c["name"] == "branchy"]
    return c


@pytest.fixture
def health_server() -> Iterator[tuple[int, list[str], type[HealthHandler]]]:
    """A local HTTP server answering every GET with ``handler.status``: its port, the
    paths it was asked for, and the handler class (set ``status`` to change answers)."""
    paths: list[str] = []
    handler: type[HealthHandler] = type("Handler", (HealthHandler,), {"paths": paths})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1], paths, handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# =============================================================================== tests
# ------------------------------------------------------------------------- Dockerfile


def test_base_image_is_a_cuda_pytorch_runtime_the_project_accepts(dockerfile: Dockerfile) -> None:
    image = dockerfile.base_image
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", image)
    assert match, f"base image {image!r} is not an official pytorch/pytorch CUDA runtime tag"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (torch_dep,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch>")]
    assert Version(match.group(1)) in SpecifierSet(torch_dep.removeprefix("torch")), (
        f"{image} ships torch {match.group(1)}, outside the project's {torch_dep}"
    )


def test_image_installs_the_project_without_dev_extras(dockerfile: Dockerfile) -> None:
    installs = [line for line in dockerfile.all("RUN") if "pip install" in line]
    assert installs, "the Dockerfile never runs pip install"
    for line in installs:
        assert "[dev]" not in line and "-e " not in line, f"dev or editable install: {line}"
    # Every file pip needs to build the project is copied: pyproject, its readme, and
    # each top-level package setuptools is told to include.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {src.rstrip("/") for sources, _ in dockerfile.copies for src in sources}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"


def test_image_runs_as_a_fixed_non_root_user(dockerfile: Dockerfile) -> None:
    user, group = dockerfile.user
    assert user not in {"root", "0"}, "the container must not run as root"
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
    assert user.isdigit(), f"USER should be a numeric uid, got {user!r}"
    assert int(user) == useradd_uid(dockerfile) and int(user) >= 1000
    assert group is not None and group.isdigit() and int(group) != 0


def test_image_bakes_in_the_zoo_and_points_the_server_at_it(dockerfile: Dockerfile) -> None:
    env = dockerfile.env
    destinations = {dest.rstrip("/") for sources, dest in dockerfile.copies if sources == ["zoo/"]}
    assert destinations == {"/app/zoo"}, "COPY zoo/ /app/zoo/ missing"
    assert env["BRANCHY_MODEL_REPOSITORY"] == "/app/zoo"
    assert env["BRANCHY_HOST"] == "0.0.0.0"  # inside the container, by design
    assert int(env.get("BRANCHY_PORT", PORT)) == PORT
    assert dockerfile.last("EXPOSE").split("/")[0] == str(PORT)


def test_state_dir_is_a_volume_the_user_owns(dockerfile: Dockerfile) -> None:
    state = dockerfile.env["BRANCHY_STATE_DIR"]
    assert state == "/app/state"
    volumes = [v for args in dockerfile.all("VOLUME") for v in json.loads(args)]
    assert state in volumes
    uid = useradd_uid(dockerfile)
    assert re.search(rf"chown\s+{uid}(:\d+)?\s+{re.escape(state)}\b", dockerfile.runs), (
        "the state folder must be writable by the server's user"
    )


def test_image_starts_the_server_in_exec_form_and_stops_on_sigterm(dockerfile: Dockerfile) -> None:
    # Exec form: python is the process that receives SIGTERM, not a shell around it.
    assert exec_form(dockerfile.last("CMD")) == ["python", "-m", "service"]
    assert dockerfile.last("STOPSIGNAL") == "SIGTERM"
    assert not dockerfile.all("ENTRYPOINT")


def test_healthcheck_has_sane_timing(dockerfile: Dockerfile) -> None:
    options, _ = dockerfile.healthcheck
    assert duration_seconds(options["timeout"]) < duration_seconds(options["interval"])
    # Model loading and warm-up happen before /readyz, but /healthz must come up soon.
    assert duration_seconds(options["start-period"]) >= 10


@pytest.mark.parametrize("source", ["Dockerfile", "compose"])
def test_healthcheck_command_probes_healthz(
    source: str,
    dockerfile: Dockerfile,
    branchy: dict[str, Any],
    health_server: tuple[int, list[str], type[HealthHandler]],
) -> None:
    port, paths, handler = health_server
    command = health_commands(dockerfile, branchy)[source]
    assert run_check(command, port) == 0
    assert paths == ["/healthz"]
    handler.status = 503
    assert run_check(command, port) != 0, "a 503 must fail the health check"


def test_healthcheck_command_fails_when_nothing_listens(
    dockerfile: Dockerfile, branchy: dict[str, Any]
) -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), HealthHandler) as probe:
        free_port = probe.server_address[1]  # closed again before the check runs
    for command in health_commands(dockerfile, branchy).values():
        assert run_check(command, free_port) != 0


# ---------------------------------------------------------------------- .dockerignore


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "data/mnist/train.gz",
        "runs/b-lenet/log.txt",
        "cache/x",
        "state/b-lenet.thresholds.json",
        "benchmarks/results/load.json",
        "tests/models/test_entropy.py",
        "models/__pycache__/branchy.cpython-311.pyc",
        "branchy_serve.egg-info/PKG-INFO",
        ".env",
    ],
)
def test_dockerignore_keeps_local_state_out_of_the_context(path: str) -> None:
    assert docker_ignores(path)


def test_dockerignore_keeps_everything_the_dockerfile_copies(dockerfile: Dockerfile) -> None:
    for sources, _ in dockerfile.copies:
        for source in sources:
            samples = [source.rstrip("/")]
            if source.endswith("/"):
                samples.append(source + "x/manifest.json")
                samples += [
                    str(p.relative_to(ROOT))
                    for p in (ROOT / source).rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts
                ][:50]
            for sample in samples:
                assert not docker_ignores(sample), f"{sample} is copied but .dockerignore drops it"


# ---------------------------------------------------------------------------- compose


def _compose_cli() -> list[str] | None:
    """A Compose implementation that can validate files without a Docker daemon."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")  # Debian's docker-compose 1.29
    return [legacy] if legacy else None


def test_compose_file_passes_composes_own_validation() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    done = subprocess.run(
        [*cli, "-f", "docker-compose.yml", "--profile", "lb", "config", "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_has_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"branchy", "prometheus", "grafana"} <= set(services)
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana")


def test_compose_builds_the_image_and_publishes_port_8000(
    branchy: dict[str, Any], k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]
) -> None:
    assert branchy["build"] in (".", {"context": "."})
    assert [p.rsplit(":", 1)[1] for p in branchy["ports"]] == [str(PORT)]
    assert branchy["ports"] == [f"{PORT}:{PORT}"]  # the default: localhost:8000
    # A port range in the variable publishes one port per replica of --scale.
    scaled = load_compose(ROOT / "docker-compose.yml", {"BRANCHY_PUBLISH_PORTS": "8000-8002"})
    assert scaled["services"]["branchy"]["ports"] == [f"8000-8002:{PORT}"]
    # Compose and Kubernetes run the same image, tagged with the project's version.
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert branchy["image"] == container["image"] == f"branchy-serve:{version}"


def test_compose_reserves_an_nvidia_gpu(branchy: dict[str, Any]) -> None:
    devices = branchy["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_cpu_override_drops_the_gpu_reservation() -> None:
    override = load_compose(DEPLOY / "compose" / "cpu.yml")["services"]["branchy"]
    assert isinstance(override["deploy"]["resources"]["reservations"]["devices"], Reset)
    assert compose_env(override) == {"BRANCHY_DEVICE": "cpu"}


def test_compose_state_volume_and_healthcheck(
    compose: dict[str, Any], branchy: dict[str, Any], dockerfile: Dockerfile
) -> None:
    state = volume_mounts(branchy)[dockerfile.env["BRANCHY_STATE_DIR"]]
    assert state in compose["volumes"], "the state folder must be a named (shared) volume"
    health = branchy["healthcheck"]
    assert "/healthz" in " ".join(health["test"])
    assert duration_seconds(health["timeout"]) < duration_seconds(health["interval"])


def test_stop_grace_periods_outlast_the_drain(
    branchy: dict[str, Any], dockerfile: Dockerfile, k8s: dict[tuple[str, str], dict[str, Any]]
) -> None:
    assert branchy.get("stop_signal", "SIGTERM") == dockerfile.last("STOPSIGNAL")
    drain = float(compose_env(branchy)["BRANCHY_GRACEFUL_SHUTDOWN_S"] or 0)
    timeout = float(compose_env(branchy)["BRANCHY_REQUEST_TIMEOUT_S"] or 0)
    assert drain >= timeout, "the drain must be long enough for a request to meet its deadline"
    assert duration_seconds(branchy["stop_grace_period"]) >= drain + 5

    pod = pod_spec(k8s)
    (c,) = pod["containers"]
    k8s_drain = float(k8s_env(c)["BRANCHY_GRACEFUL_SHUTDOWN_S"] or 0)
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + k8s_drain + 5


def test_nginx_balances_the_branchy_service(
    compose: dict[str, Any], branchy: dict[str, Any]
) -> None:
    lb = compose["services"]["lb"]
    assert lb["profiles"] == ["lb"] and lb["image"].startswith("nginx:")
    conf_path = [s for t, s in volume_mounts(lb).items() if t == "/etc/nginx/nginx.conf"]
    conf = (ROOT / conf_path[0]).read_text()
    assert re.search(rf"server\s+branchy:{PORT}\b", conf)
    # nginx must not answer 413 with HTML before the server's own JSON 413, nor give up
    # before the server's 504.
    body_mb = int(nginx_directive(conf, "client_max_body_size").removesuffix("m"))
    assert body_mb * 2**20 > int(compose_env(branchy)["BRANCHY_MAX_BODY_BYTES"] or 0)
    read_s = duration_seconds(nginx_directive(conf, "proxy_read_timeout"))
    assert read_s > float(compose_env(branchy)["BRANCHY_REQUEST_TIMEOUT_S"] or 0)


# --------------------------------------------------------- environment and settings


def _deploy_envs(
    dockerfile: Dockerfile, branchy: dict[str, Any], container: dict[str, Any]
) -> dict[str, dict[str, str | None]]:
    # The image also sets interpreter and pip variables (PYTHON*, PIP_*); only its
    # BRANCHY_* ones are the server's.
    return {
        "Dockerfile": {k: v for k, v in dockerfile.env.items() if k.startswith("BRANCHY_")},
        "compose": compose_env(branchy),
        "compose cpu override": compose_env(
            load_compose(DEPLOY / "compose" / "cpu.yml")["services"]["branchy"]
        ),
        "k8s": k8s_env(container),
    }


def test_server_env_vars_are_branchy_settings(
    dockerfile: Dockerfile, branchy: dict[str, Any], container: dict[str, Any]
) -> None:
    for where, env in _deploy_envs(dockerfile, branchy, container).items():
        bad = [k for k in env if not k.startswith("BRANCHY_")]
        assert not bad, f"{where} sets non-BRANCHY_ variables for the server: {bad}"


def test_server_env_vars_are_fields_of_the_settings_class_and_valid(
    dockerfile: Dockerfile,
    branchy: dict[str, Any],
    container: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings_class = _service_module("settings").Settings
    prefix = settings_class.model_config.get("env_prefix", "")
    known = {prefix + name.upper() for name in settings_class.model_fields}
    (tmp_path / "zoo").mkdir()
    for where, env in _deploy_envs(dockerfile, branchy, container).items():
        unknown = sorted(set(env) - known)
        assert not unknown, f"{where} sets variables the server does not read: {unknown}"
        # The values must pass the server's own validation (start-up would stop otherwise).
        with monkeypatch.context() as m:
            for name, value in env.items():
                if value is not None and name != "BRANCHY_MODEL_REPOSITORY":
                    m.setenv(name, value)
            settings_class(model_repository=tmp_path / "zoo")


def test_deployment_doc_names_every_variable_set(
    dockerfile: Dockerfile, branchy: dict[str, Any], container: dict[str, Any]
) -> None:
    doc = (ROOT / "docs" / "deployment.md").read_text()
    for where, env in _deploy_envs(dockerfile, branchy, container).items():
        missing = [k for k in env if k.startswith("BRANCHY_") and k not in doc]
        assert not missing, f"docs/deployment.md does not explain {missing} (set in {where})"


# ------------------------------------------------------------------------- Prometheus


def _prometheus_config() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())


def test_prometheus_scrapes_every_branchy_replica_on_metrics(compose: dict[str, Any]) -> None:
    config = _prometheus_config()
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "branchy"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for sc in job.get("static_configs", []) for t in sc["targets"]}
    for sd in job.get("dns_sd_configs", []):
        targets |= {f"{name}:{sd['port']}" for name in sd["names"]}
    assert targets == {f"branchy:{PORT}"}
    assert "branchy" in compose["services"]


def test_compose_mounts_the_prometheus_config_where_prometheus_reads_it(
    compose: dict[str, Any],
) -> None:
    prometheus = compose["services"]["prometheus"]
    config = next(
        a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file=")
    )
    mounts = volume_mounts(prometheus)
    folder = str(Path(config).parent)
    assert mounts[folder] == "./deploy/prometheus"
    for rule_file in _prometheus_config()["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file(), rule_file


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = volume_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    # Grafana reaches Prometheus by its compose service name and container port.
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    assert any(p.endswith(":9090") for p in compose["services"]["prometheus"]["ports"])
    assert source["jsonData"]["timeInterval"] == _prometheus_config()["global"]["scrape_interval"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "branchy.yml").read_text())[
        "providers"
    ]
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    # Every panel and query uses the provisioned datasource.
    board = dashboard()
    for panel in board["panels"]:
        uids = {panel["datasource"]["uid"]} | {t["datasource"]["uid"] for t in panel["targets"]}
        assert uids == {source["uid"]}, panel["title"]


def test_dashboard_has_the_panels_operators_need() -> None:
    exprs = {q.where: re.sub(r"\s+", " ", q.expr) for q in dashboard_queries()}
    board = dashboard()

    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs.values())

    # Exit shares: rate of exits per exit over the rate of all exits.
    assert has(r"sum by \([^)]*\bexit\b[^)]*\) \(rate\(branchy_exit_total.*\) / .*sum by")
    for histogram in ("branchy_request_duration_seconds", "branchy_inference_duration_seconds"):
        assert has(
            rf"histogram_quantile\(0\.95, sum by \([^)]*\ble\b[^)]*\) \(rate\({histogram}_bucket"
        )
    assert has(r"branchy_batch_size_(sum|bucket)")
    assert has(r"branchy_queue_depth")
    assert has(r"sum by \([^)]*\breason\b[^)]*\) \(rate\(branchy_rejected_total")
    assert has(r"branchy_threshold")
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert board["uid"] and board["templating"]["list"][0]["name"] == "model"


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize("query", ALL_QUERIES, ids=lambda q: q.where)
def test_queries_use_contract_metrics_and_labels(query: Query) -> None:
    series = contract_series()
    recorded = recorded_names()
    names = metric_names(query.expr)
    raw = {n for n in names if ":" not in n}
    assert raw <= set(series), f"{query.where}: not in the service contract: {raw - set(series)}"
    assert {n for n in names if ":" in n} <= recorded, f"{query.where}: unknown recording rule"
    if not raw:
        return
    allowed = set().union(*(series[n] for n in raw)) | TARGET_LABELS
    assert grouping_labels(query.expr) <= allowed, f"{query.where}: unknown label in by()/on()"
    for name, labels in matcher_labels(query.expr).items():
        if name in series:
            assert labels <= series[name] | TARGET_LABELS, f"{query.where}: {name}{labels}"
    legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", query.legend))
    assert legend <= allowed, f"{query.where}: legend uses unknown labels {legend - allowed}"


def _exported_series() -> set[str]:
    """Every sample name the server's metrics registry can expose."""
    registry = _service_module("metrics").Metrics().registry
    exported: set[str] = set()
    for family in registry.collect():
        if family.type == "histogram":
            exported |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")}
        elif family.type == "counter":
            exported.add(f"{family.name}_total")
        else:
            exported.add(family.name)
    return exported


def test_queried_metrics_exist_in_the_servers_registry() -> None:
    exported = _exported_series()
    used = {n for q in ALL_QUERIES for n in metric_names(q.expr) if ":" not in n}
    assert used <= exported, f"queried but not exported by the server: {sorted(used - exported)}"


def test_contract_metric_list_is_what_the_server_exports() -> None:
    # The dashboard and rules are checked against the contract's list, so the list must
    # not drift from the server's registry in either direction.
    assert set(contract_series()) == _exported_series()


def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )


@NEEDS_PROMTOOL
def test_promtool_accepts_the_config_and_rules() -> None:
    done = _promtool("check", "config", "deploy/prometheus/prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    done = _promtool("check", "rules", "deploy/prometheus/rules.yml")
    assert done.returncode == 0, done.stdout + done.stderr


@NEEDS_PROMTOOL
def test_promtool_rule_unit_tests_pass() -> None:
    done = _promtool("test", "rules", "rules_test.yml", cwd=DEPLOY / "prometheus")
    assert done.returncode == 0, done.stdout + done.stderr


def _synthetic_series() -> list[dict[str, str]]:
    """A minute-by-minute history of every contract metric as the server would export
    it: two models' worth of label values, exits 0 and 1 at 30 and 10 images/min."""
    out = []
    values = {
        "exit": ["0", "1"],
        "endpoint": ["classify"],
        "code": ["200"],
        "reason": ["queue_full"],
        "agree": ["true", "false"],
    }
    values |= {
        "model": ["b-lenet"],
        "device": ["cuda:0"],
        "architecture": ["b-lenet"],
        "exits": ["2"],
        "runtime": ["onnxruntime"],
        "precision": ["fp32"],
    }
    for name, metric in contract_metrics().items():
        for sample, labels in metric.series(name).items():
            combos: list[dict[str, str]] = [{"instance": "10.0.0.2:8000", "job": "branchy"}]
            for label in sorted(labels - {"le"}):
                combos = [c | {label: v} for c in combos for v in values[label]]
            for combo in combos:
                rate = 30 if combo.get("exit") == "0" else 10
                les = ["0.1", "1", "+Inf"] if "le" in labels else [None]
                for le in les:
                    labels_text = combo | ({"le": le} if le else {})
                    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels_text.items()))
                    history = "1x20" if metric.kind == "gauge" else f"0+{rate}x20"
                    out.append({"series": f"{sample}{{{selector}}}", "values": history})
    return out


@NEEDS_PROMTOOL
def test_every_dashboard_query_is_valid_promql_and_returns_data(tmp_path: Path) -> None:
    """Run each dashboard query through promtool on synthetic series of every contract
    metric: a syntax error, a misspelt metric or a label that never matches fails."""
    queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": as_promql(q.expr)} for i, q in enumerate(queries)
    ]}]}  # fmt: skip
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    done = _promtool("check", "rules", str(tmp_path / "dashboard_rules.yml"))
    assert done.returncode == 0, done.stdout + done.stderr

    non_empty = [
        {"expr": f"count({as_promql(q.expr)}) > bool 0", "eval_time": "10m",
         "exp_samples": [{"labels": "{}", "value": 1}]}
        for q in queries
    ]  # fmt: skip
    (exit_shares,) = [q for q in queries if "branchy_exit_total" in q.expr and " / " in q.expr]
    shares = {
        "expr": f"round({as_promql(exit_shares.expr)}, 0.001)", "eval_time": "10m",
        "exp_samples": [
            {"labels": '{model="b-lenet", exit="0"}', "value": 0.75},
            {"labels": '{model="b-lenet", exit="1"}', "value": 0.25},
        ],
    }  # fmt: skip
    tests = {
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": _synthetic_series(),
                   "promql_expr_test": [*non_empty, shares]}],
    }  # fmt: skip
    (tmp_path / "dashboard_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    done = _promtool("test", "rules", "dashboard_test.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------- Kubernetes


def test_k8s_deployment_runs_gpu_replicas_with_probes(
    k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any], dockerfile: Dockerfile
) -> None:
    deployment = k8s[("Deployment", "branchy")]
    assert deployment["spec"]["replicas"] >= 2
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template_labels.items()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert re.fullmatch(r"auto|cuda(:\d+)?", k8s_env(container)["BRANCHY_DEVICE"] or "")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("http", PORT), probe


def test_k8s_pod_is_non_root_with_the_images_uid(
    k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any], dockerfile: Dockerfile
) -> None:
    pod = pod_spec(k8s)["securityContext"]
    uid = int(dockerfile.user[0])
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid
    assert pod["fsGroup"] == int(dockerfile.user[1] or 0)
    own = container["securityContext"]
    assert own["allowPrivilegeEscalation"] is False and own["capabilities"]["drop"] == ["ALL"]
    if own.get("readOnlyRootFilesystem"):
        mounted = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", dockerfile.env["BRANCHY_STATE_DIR"]} <= mounted


def test_k8s_state_dir_is_a_shared_read_write_many_volume(
    k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any], dockerfile: Dockerfile
) -> None:
    state_dir = k8s_env(container).get("BRANCHY_STATE_DIR") or dockerfile.env["BRANCHY_STATE_DIR"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == state_dir]
    (volume,) = [v for v in pod_spec(k8s)["volumes"] if v["name"] == mount["name"]]
    claim = k8s[("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    assert float(k8s_env(container)["BRANCHY_STATE_POLL_S"] or 0) > 0, (
        "replicas must poll the shared state folder for threshold changes"
    )


def test_k8s_service_and_servicemonitor_reach_the_pods(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    pod_labels = k8s[("Deployment", "branchy")]["spec"]["template"]["metadata"]["labels"]
    services = {name: obj for (kind, name), obj in k8s.items() if kind == "Service"}
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
        (port,) = service["spec"]["ports"]
        assert port["port"] == PORT and port["targetPort"] in ("http", PORT)
    monitor = k8s[("ServiceMonitor", "branchy")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    # Exactly one Service is scraped, else every pod would be scraped twice.
    scraped = [n for n, s in services.items() if wanted <= s["metadata"]["labels"].items()]
    assert scraped == ["branchy"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in services["branchy"]["spec"]["ports"]}


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
