"""Parsers of the deployment files, for ``tests/deploy``: the Dockerfile, compose file
(with its variable interpolation and ``!reset`` tag), Kubernetes manifests, the metric list
of ``docs/service-contract.md``, the PromQL of the Grafana dashboard and the Prometheus
rules, ``.dockerignore``, and a runner for the containers' health-check commands.

Only reading and parsing lives here; what the files must say is in the tests.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CONTRACT = ROOT / "docs" / "service-contract.md"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "branchy.json"
PORT = 8000
PROMTOOL = shutil.which("promtool")
# Labels Prometheus adds to every scraped series, besides the server's own.
TARGET_LABELS = {"instance", "job"}


# --------------------------------------------------------------------------- Dockerfile


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: upper-case keyword and the rest of the (joined) line."""

    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions: comments dropped, ``\\`` continuations joined."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        # Comment lines are removed even inside a continued instruction, as Docker does.
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _options(args: str) -> tuple[dict[str, str], str]:
    """``--name=value`` options at the start of an instruction, and what follows them."""
    options = {}
    while args.startswith("--"):
        option, _, args = args.partition(" ")
        name, _, value = option[2:].partition("=")
        options[name] = value
        args = args.lstrip()
    return options, args


@dataclass(frozen=True)
class Dockerfile:
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"Dockerfile has no {keyword}"
        return found[-1]

    @property
    def base_image(self) -> str:
        # Resolve ARG defaults used in FROM (ARG before FROM is the documented way).
        args = {}
        for value in self.all("ARG"):
            name, _, default = value.partition("=")
            args[name] = default
        image = self.last("FROM").split()[0]
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image)

    @property
    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for value in self.all("ENV"):
            tokens = shlex.split(value)
            if "=" in tokens[0]:
                env.update(dict(t.split("=", 1) for t in tokens))
            else:  # legacy form: ENV NAME value with spaces
                env[tokens[0]] = " ".join(tokens[1:])
        return env

    @property
    def copies(self) -> list[tuple[list[str], str]]:
        """``(sources, destination)`` of every COPY from the build context."""
        out = []
        for value in self.all("COPY"):
            options, rest = _options(value)
            if "from" in options:
                continue
            parts = exec_form(rest) if rest.startswith("[") else shlex.split(rest)
            out.append((parts[:-1], parts[-1]))
        return out

    @property
    def runs(self) -> str:
        return "\n".join(self.all("RUN"))

    @property
    def user(self) -> tuple[str, str | None]:
        user, _, group = self.last("USER").partition(":")
        return user, group or None

    @property
    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        options, rest = _options(self.last("HEALTHCHECK"))
        keyword, _, command = rest.partition(" ")
        assert keyword.upper() == "CMD", f"HEALTHCHECK must run a command, got {rest!r}"
        return options, exec_form(command)


def useradd_uid(dockerfile: Dockerfile) -> int:
    match = re.search(r"useradd\b[^\n&;]*--uid[ =](\d+)", dockerfile.runs)
    assert match, "the Dockerfile creates no user with a fixed --uid"
    return int(match.group(1))


# ---------------------------------------------------------------- compose, YAML, contract


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution (``${X}``, ``${X:-d}``, ``${X-d}``, ``$$``) with
    ``env`` as the host environment, applied to every string in ``value``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\$|\$\{(\w+)(?:(:-|-)([^}]*))?\}", substitute, value)


class ComposeLoader(yaml.SafeLoader):
    """YAML loader that understands compose's ``!reset`` and ``!override`` merge tags."""


@dataclass(frozen=True)
class Reset:
    value: Any


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset(None))
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: Reset(
        loader.construct_sequence(node)
        if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node)
    ),
)


def load_compose(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate(yaml.load(path.read_text(), Loader=ComposeLoader), env or {})


def compose_env(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [e.split("=", 1) if "=" in e else [e, None] for e in env]
        return {k: v for k, v in pairs}
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Short-syntax volumes as ``target -> source``."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        out[target] = source
    return out


def duration_seconds(duration: str) -> float:
    units = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(number) * units[unit]
    assert total > 0, f"cannot read duration {duration!r}"
    return total


def nginx_directive(conf: str, name: str) -> str:
    """The value of an nginx directive (the first occurrence)."""
    match = re.search(rf"^\s*{name}\s+([^;]+);", conf, re.M)
    assert match, f"nginx.conf sets no {name}"
    return match.group(1).strip()


def load_manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object under deploy/k8s by ``(kind, name)``."""
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def pod_spec(k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return k8s[("Deployment", "branchy")]["spec"]["template"]["spec"]


def k8s_env(container: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@dataclass(frozen=True)
class ContractMetric:
    kind: str  # histogram | counter | gauge
    labels: frozenset[str]

    def series(self, name: str) -> dict[str, frozenset[str]]:
        """Every sample name this metric exposes, with its labels."""
        if self.kind == "histogram":
            return {
                f"{name}_bucket": self.labels | {"le"},
                f"{name}_sum": self.labels,
                f"{name}_count": self.labels,
            }
        return {name: self.labels}


def contract_metrics() -> dict[str, ContractMetric]:
    """The metric list of docs/service-contract.md: name -> kind and labels."""
    text = CONTRACT.read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    metrics = {}
    kinds = {"Histograms": "histogram", "Counters": "counter", "Gauges": "gauge"}
    for heading, body in re.findall(
        r"(Histograms|Counters|Gauges):(.*?)(?=Histograms:|Counters:|Gauges:|\Z)", section, re.S
    ):
        for name, labels in re.findall(r"`(branchy_\w+)(?:\{([\w,]*)\})?`", body):
            metrics[name] = ContractMetric(
                kinds[heading], frozenset(filter(None, labels.split(",")))
            )
    assert len(metrics) >= 10, f"could not read the metric list of {CONTRACT}"
    return metrics


def contract_series() -> dict[str, frozenset[str]]:
    series: dict[str, frozenset[str]] = {}
    for name, metric in contract_metrics().items():
        series.update(metric.series(name))
    return series


# ---------------------------------------------------------------------------- PromQL


@dataclass(frozen=True)
class Query:
    where: str
    expr: str
    legend: str = ""


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[Query]:
    queries = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            where = f"dashboard panel {panel['title']!r} {target['refId']}"
            queries.append(Query(where, target["expr"], target.get("legendFormat", "")))
    return queries


def rules_file() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())


def rule_queries() -> list[Query]:
    queries = []
    for group in rules_file()["groups"]:
        for rule in group["rules"]:
            name = rule.get("record") or rule["alert"]
            queries.append(Query(f"rule {name}", rule["expr"]))
    return queries


def recorded_names() -> set[str]:
    return {r["record"] for g in rules_file()["groups"] for r in g["rules"] if "record" in r}


def as_promql(expr: str) -> str:
    """A dashboard query as Prometheus sees it with the variables at their defaults."""
    return expr.replace("$__rate_interval", "1m").replace("$model", ".*")


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(branchy(?::|_)[\w:]+)", expr))


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for group in re.findall(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr
    ):
        labels.update(label.strip() for label in group.split(",") if label.strip())
    return labels


def matcher_labels(expr: str) -> dict[str, set[str]]:
    """Labels matched in ``metric{label="..."}`` selectors, by metric."""
    out: dict[str, set[str]] = {}
    for name, body in re.findall(r"\b([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr):
        out.setdefault(name, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body))
    return out


ALL_QUERIES = dashboard_queries() + rule_queries()


# ------------------------------------------------------------------ health-check runner


class HealthHandler(BaseHTTPRequestHandler):
    status = 200
    paths: list[str]

    def do_GET(self) -> None:
        self.paths.append(self.path)
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest's output clean


def run_check(command: list[str], port: int) -> int:
    """Run a container health check here: ``python`` becomes this interpreter, and the
    port comes from BRANCHY_PORT as the image's ENV sets it."""
    assert command[0] == "python", f"health check must use the image's python: {command}"
    env = {"BRANCHY_PORT": str(port), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=20)
    return done.returncode


def health_commands(dockerfile: Dockerfile, branchy: dict[str, Any]) -> dict[str, list[str]]:
    test = branchy["healthcheck"]["test"]
    assert test[0] == "CMD", "compose healthcheck must be exec form ['CMD', ...]"
    return {"Dockerfile": dockerfile.healthcheck[1], "compose": test[1:]}


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob: ``**`` any depth, ``*``/``?`` within one path part."""
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def docker_ignores(path: str) -> bool:
    """Whether ``path`` (relative to the context) is left out of the build context."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            patterns.append((negated, _ignore_regex(line.lstrip("!"))))
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negated, regex in patterns:
        # Like Docker: a pattern matches a path when it matches the path or a parent.
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negated
    return ignored
