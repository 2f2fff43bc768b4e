"""Lints and renders helm/llm-gateway the way `helm lint --strict` and
`helm template` do, with Helm's own Go SDK (PyPI helm-python-sdk: no package
on the registries CI reaches ships a helm binary for Linux).

    python chart.py CHART OUT_DIR VALUES_FILE...

For each values set (the defaults, then each file): lint, render for
Kubernetes 1.32 with the Prometheus Operator's API present, and write
OUT_DIR/objects/<set>.yaml (every object) and OUT_DIR/config/<set>.yaml (the
config the ConfigMap holds, for `llm-gateway check-config`). Then asserts what the
schema cannot (probes, drain timing, security, the ServiceMonitor gate) and
that bad values are refused. Exits non-zero on the first problem.
"""

import json
import pathlib
import sys

import yaml
from helm_python import HelmError, _native, lint
from helm_python.chart import Chart

KUBE_VERSION = "v1.32.0"
MONITORING = "monitoring.coreos.com/v1"


def render(chart, values, api_versions):
    # Chart.render() does not pass the capabilities on; the native call
    # takes them as `helm template --kube-version --api-versions` does.
    opts = {
        "name": "ci",
        "namespace": "gateway",
        "is_install": True,
        "kube_version": KUBE_VERSION,
        "api_versions": api_versions,
    }
    out = _native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts))
    return json.loads(out)


def objects(manifests):
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def fail(message):
    print(f"chart: {message}", file=sys.stderr)
    sys.exit(1)


def check(cond, message):
    if not cond:
        fail(message)


def lint_chart(chart_dir, values, name):
    report = lint(chart_dir, values, strict=True, kube_version=KUBE_VERSION)
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    problems += [{"error": e} for e in report.get("errors", [])]
    for m in problems:
        print(f"helm lint ({name}): {m.get('path', '')} {m['error']}", file=sys.stderr)
    check(not problems, f"helm lint --strict failed for {name}")
    print(f"helm lint --strict ({name}): ok")


def check_deployment(docs, values, name):
    deployments = by_kind(docs, "Deployment")
    check(len(deployments) == 1, f"{name}: one Deployment")
    pod = deployments[0]["spec"]["template"]
    spec = pod["spec"]
    c = spec["containers"][0]
    tls = values.get("tls", {}).get("enabled", False)
    for probe in ("readinessProbe", "livenessProbe"):
        p = c[probe]
        if tls:
            check("httpGet" in p, f"{name}: {probe} is HTTP with TLS on")
        else:
            check(p.get("grpc", {}).get("port") == 50051, f"{name}: {probe} is a gRPC probe")
    check(c["readinessProbe"].get("grpc", {}).get("service", "llmgateway.v1.LlmGateway")
          == "llmgateway.v1.LlmGateway", f"{name}: readiness asks for the gateway's service")
    sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    check(sleep > 0, f"{name}: a preStop sleep")
    check(spec["terminationGracePeriodSeconds"] > sleep + 6, f"{name}: the grace period covers the drain")
    sc = c["securityContext"]
    check(sc.get("readOnlyRootFilesystem") is True, f"{name}: read-only root filesystem")
    check(sc.get("allowPrivilegeEscalation") is False, f"{name}: no privilege escalation")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: all capabilities dropped")
    psc = spec["securityContext"]
    check(psc.get("runAsNonRoot") is True, f"{name}: non-root")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp RuntimeDefault")
    res = c["resources"]
    check(res.get("requests") and res.get("limits", {}).get("memory"), f"{name}: requests and a memory limit")
    if values.get("rollOnConfigChange", True):
        check("checksum/config" in pod["metadata"]["annotations"], f"{name}: the config checksum annotation")
    for m in c["volumeMounts"]:
        check("subPath" not in m, f"{name}: no subPath mount (updates would not reach it)")
    services = by_kind(docs, "Service")
    main = [s for s in services if s["spec"].get("clusterIP") != "None"][0]
    grpc = [p for p in main["spec"]["ports"] if p["name"] == "grpc"][0]
    check(grpc.get("appProtocol") == "grpc", f"{name}: the Service's grpc port has appProtocol grpc")


def expect_refused(chart, values, what):
    try:
        render(chart, values, [MONITORING])
    except HelmError as e:
        print(f"refused as expected: {what} ({str(e).splitlines()[0][:120]})")
        return
    fail(f"values were accepted but should be refused: {what}")


def main():
    if len(sys.argv) < 3:
        fail("usage: chart.py CHART OUT_DIR [VALUES_FILE...]")
    chart_dir = sys.argv[1]
    out = pathlib.Path(sys.argv[2])
    for sub in ("objects", "config"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    chart = Chart.load(chart_dir)
    sets = [("default", {})]
    for f in sys.argv[3:]:
        sets.append((pathlib.Path(f).stem, yaml.safe_load(pathlib.Path(f).read_text()) or {}))

    for name, values in sets:
        lint_chart(chart_dir, values, name)
        try:
            manifests = render(chart, values, [MONITORING])
        except HelmError as e:
            fail(f"helm template ({name}): {e}")
        docs = objects(manifests)
        (out / "objects" / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        configmaps = by_kind(docs, "ConfigMap")
        check(len(configmaps) == 1, f"{name}: one ConfigMap")
        (out / "config" / f"{name}.yaml").write_text(configmaps[0]["data"]["config.yaml"])
        check_deployment(docs, values, name)
        monitors = len(by_kind(docs, "ServiceMonitor"))
        wanted = values.get("serviceMonitor", {}).get("enabled", False)
        check(monitors == (1 if wanted else 0), f"{name}: ServiceMonitor rendered iff enabled")
        if wanted:
            # Without the operator's API, no ServiceMonitor (the install
            # would fail on a cluster without the CRD).
            docs = objects(render(chart, values, []))
            check(not by_kind(docs, "ServiceMonitor"), f"{name}: no ServiceMonitor without {MONITORING}")
        kinds = sorted({d["kind"] for d in objects(manifests)})
        print(f"helm template ({name}): {', '.join(kinds)}")

    expect_refused(chart, {"replicas": 3}, "an unknown top-level key")
    expect_refused(chart, {"tls": {"enable": True}}, "an unknown nested key")
    expect_refused(chart, {"config": {"listen": "0.0.0.0:1"}}, "config.listen (the chart's)")
    expect_refused(chart, {"terminationGracePeriodSeconds": 30}, "a grace period shorter than the drain")
    expect_refused(chart, {"secrets": {"providerKeys": {"OPENAI_API_KEY": "openai"}}},
                   "a provider key with no Secret holding it")
    expect_refused(chart, {"tls": {"enabled": True}}, "TLS without a Secret")


if __name__ == "__main__":
    main()
