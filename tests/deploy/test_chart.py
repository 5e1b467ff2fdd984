"""Checks of the Helm chart, the plain manifests, the Dockerfile and the examples.

The chart is rendered and linted by Helm's own engine (PyPI helm-python-sdk,
which embeds the Helm Go SDK) and every rendered object is validated against
the Kubernetes OpenAPI schemas (PyPI kubernetes-validate). No cluster is used.
Run with `bash tests/deploy/run.sh`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import posixpath
import re
import subprocess
from pathlib import Path

import helm_python
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "deploy" / "helm" / "lunanode-csi"
PLAIN_MANIFESTS = REPO / "deploy" / "kubernetes" / "lunanode-csi.yaml"
EXAMPLES_DIR = REPO / "examples"

RELEASE = "lunanode-csi"
NAMESPACE = "kube-system"

# Fixed by the driver binary.
DRIVER_NAME = "csi.lunanode.com"
TOPOLOGY_KEY = "topology.csi.lunanode.com/region"
SOCKET = "/csi/csi.sock"

# Kubernetes versions whose OpenAPI schemas every rendered object must pass:
# an older still-common release and the newest the pinned kubernetes-validate
# ships.
K8S_VERSIONS = ("1.31", "1.37")

# Custom resources: not in the core schemas, checked structurally below.
CRD_KINDS = {
    "VolumeSnapshotClass": "snapshot.storage.k8s.io/v1",
    "VolumeSnapshot": "snapshot.storage.k8s.io/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
}

BUILD_COMMAND = "cargo build --release --locked"

UPSTREAM_IMAGES = {
    "csiProvisioner": ("registry.k8s.io/sig-storage/csi-provisioner", "v5.3.0"),
    "csiAttacher": ("registry.k8s.io/sig-storage/csi-attacher", "v4.9.0"),
    "csiResizer": ("registry.k8s.io/sig-storage/csi-resizer", "v1.14.0"),
    "csiSnapshotter": ("registry.k8s.io/sig-storage/csi-snapshotter", "v8.3.0"),
    "livenessProbe": ("registry.k8s.io/sig-storage/livenessprobe", "v2.16.0"),
    "nodeDriverRegistrar": ("registry.k8s.io/sig-storage/csi-node-driver-registrar", "v2.14.0"),
}

# The driver's `serve` flags; the chart must not pass anything else.
DRIVER_FLAGS = {
    "--endpoint", "--mode", "--api-id-file", "--api-key-file", "--api-url",
    "--default-region", "--region", "--node-id", "--node-id-source", "--by-id-dir",
    "--max-volumes-per-node", "--log-format", "--log-level", "--metrics-addr",
    "--qps", "--burst", "--api-max-in-flight", "--api-nonce", "--attach-target",
}

# `lunanode-csi preflight`'s flags, as the `helm test` pod may pass them.
PREFLIGHT_FLAGS = {
    "--api-id-file", "--api-key-file", "--api-url", "--api-nonce", "--attach-target",
    "--node-id-source", "--region", "--by-id-dir", "--fs-type", "--device-wait-secs",
}

# What each sidecar needs from the Kubernetes API: (apiGroup, resource) -> verbs.
# After the upstream RBAC of each kubernetes-csi sidecar, reduced to what this
# driver uses (no secrets, no capacity tracking, no group snapshots).
NEEDED_RULES = {
    "csi-provisioner": {
        ("", "persistentvolumes"): {"get", "list", "watch", "create", "delete"},
        ("", "persistentvolumeclaims"): {"get", "list", "watch", "update"},
        ("storage.k8s.io", "storageclasses"): {"get", "list", "watch"},
        ("", "events"): {"create", "patch"},
        ("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list"},
        ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list"},
        # Topology=true: the provisioner reads node topology from CSINodes/Nodes.
        ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
        ("", "nodes"): {"get", "list", "watch"},
        # attachRequired: no delete while the volume is still attached.
        ("storage.k8s.io", "volumeattachments"): {"get", "list", "watch"},
    },
    "csi-attacher": {
        ("", "persistentvolumes"): {"get", "list", "watch", "patch"},
        ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
        ("storage.k8s.io", "volumeattachments"): {"get", "list", "watch", "patch"},
        ("storage.k8s.io", "volumeattachments/status"): {"patch"},
    },
    "csi-resizer": {
        ("", "persistentvolumes"): {"get", "list", "watch", "patch"},
        ("", "persistentvolumeclaims"): {"get", "list", "watch"},
        ("", "persistentvolumeclaims/status"): {"patch"},
        # --handle-volume-inuse-error: offline expansion waits for pods to go.
        ("", "pods"): {"list", "watch"},
        ("", "events"): {"create", "patch"},
    },
    "csi-snapshotter": {
        ("", "events"): {"create", "patch"},
        ("snapshot.storage.k8s.io", "volumesnapshotclasses"): {"get", "list", "watch"},
        ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list", "watch", "update", "patch"},
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status"): {"update", "patch"},
    },
}
# Leader election, needed in the lease namespace by every sidecar that elects.
LEASE_RULE = {("coordination.k8s.io", "leases"): {"get", "list", "watch", "create", "update", "delete"}}
LEADER_ELECTED = ("csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter")

CUSTOM_VALUES = {
    "credentials": {"existingSecret": "my-lunanode-api"},
    "apiUrl": "https://dynamic.lunanode.com/api",
    "region": "montreal",
    "image": {
        "driver": {"repository": "registry.example.com/storage/lunanode-csi", "tag": "dev-1234",
                   "pullPolicy": "Always"},
        "csiProvisioner": {"repository": "mirror.example.com/csi-provisioner", "tag": "v5.3.0-mirror"},
        "csiAttacher": {"repository": "mirror.example.com/csi-attacher", "tag": "v4.9.0-mirror"},
        "csiResizer": {"repository": "mirror.example.com/csi-resizer", "tag": "v1.14.0-mirror"},
        "csiSnapshotter": {"repository": "mirror.example.com/csi-snapshotter", "tag": "v8.3.0-mirror"},
        "livenessProbe": {"repository": "mirror.example.com/livenessprobe", "tag": "v2.16.0-mirror"},
        "nodeDriverRegistrar": {"repository": "mirror.example.com/csi-node-driver-registrar",
                                "tag": "v2.14.0-mirror"},
    },
    "imagePullSecrets": ["mirror-pull"],
    "controller": {"replicas": 1, "qps": 5, "burst": 10, "apiMaxInFlight": 0, "apiNonce": "increasing",
                   "logFormat": "text", "logLevel": "debug",
                   "podDisruptionBudget": {"enabled": False}},
    "node": {"idSource": "smbios", "maxVolumesPerNode": 8, "byIdDir": "/dev/disk/by-id",
             "hostNetwork": True, "kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet"},
    "storageClasses": [
        {"name": "lunanode-ext4", "default": True, "fsType": "ext4"},
        {"name": "lunanode-montreal-xfs", "fsType": "xfs", "region": "montreal",
         "allowedRegions": ["montreal"], "reclaimPolicy": "Retain",
         "mountOptions": ["noatime"]},
    ],
    "volumeSnapshotClass": {"name": "lunanode-retain", "default": False, "deletionPolicy": "Retain"},
    "metrics": {"enabled": True, "port": 9808,
                "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
}

# What the README's install command sets besides the credentials: the one value the chart
# requires. render() puts it under every scenario unless told otherwise.
MINIMAL_VALUES = {"region": "toronto"}

# A cluster with nodes in two regions: one node DaemonSet per region.
MULTI_VALUES = {
    "node": {"regions": ["toronto", "montreal"], "regionLabel": "example.com/lunanode-region"},
    "region": "montreal",
}

SCENARIOS = {"default": {}, "custom": CUSTOM_VALUES}
# Everything of deploy/monitoring/ on: node plugin metrics and their PodMonitor, the
# PrometheusRule, the dashboard ConfigMap.
MONITORING_DIR = REPO / "deploy" / "monitoring"
MONITORING_VALUES = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "node": {"enabled": True},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        "dashboard": {"enabled": True, "annotations": {"grafana_folder": "Storage"}},
    },
}
# Scenarios every object of which is checked by schema and lint (more than one DaemonSet
# in "multi", so tests of "the" node DaemonSet use SCENARIOS).
ALL_SCENARIOS = {**SCENARIOS, "multi": MULTI_VALUES, "monitoring": MONITORING_VALUES}
REGIONS = {"toronto", "montreal", "roubaix"}


# --------------------------------------------------------------------------- helpers

class Rendered:
    """One render of the chart: the objects and NOTES.txt."""

    def __init__(self, values: dict, manifests: dict[str, str]):
        self.values = values
        self.notes = ""
        self.objects: list[dict] = []
        for path in sorted(manifests):
            if path.endswith("NOTES.txt"):
                self.notes = manifests[path]
                continue
            for doc in yaml.safe_load_all(manifests[path]):
                if doc:
                    self.objects.append(doc)

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def controller(self) -> dict:
        return self.one("StatefulSet")

    @property
    def node(self) -> dict:
        return self.one("DaemonSet")

    @property
    def nodes(self) -> list[dict]:
        return self.of_kind("DaemonSet")


def with_minimal(values: dict | None) -> dict:
    return {**MINIMAL_VALUES, **copy.deepcopy(values or {})}


def render(values: dict | None = None, *, minimal: bool = True) -> Rendered:
    """Render with `values`, on top of MINIMAL_VALUES unless minimal=False."""
    values = with_minimal(values) if minimal else copy.deepcopy(values or {})
    with helm_python.Chart.load(CHART_DIR) as chart:
        return Rendered(values, chart.render(copy.deepcopy(values), name=RELEASE,
                                             namespace=NAMESPACE))


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict, name: str) -> dict:
    found = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name} in {workload['metadata']['name']}"
    return found[0]


def flags(c: dict) -> dict[str, str | None]:
    """A container's --flag=value / --flag value / --flag arguments as a dict."""
    args = list(c.get("command", [])[1:]) + list(c.get("args", []))
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            if "=" in arg:
                key, value = arg.split("=", 1)
                out[key] = value
            elif i + 1 < len(args) and not args[i + 1].startswith("-"):
                out[arg] = args[i + 1]
                i += 1
            else:
                out[arg] = None
        i += 1
    return out


def mount_at(workload: dict, c: dict, path: str) -> tuple[dict, dict]:
    """The volumeMount of container c at path and the pod volume behind it."""
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"{c['name']} has no mount at {path}"
    volumes = [v for v in pod_spec(workload)["volumes"] if v["name"] == mounts[0]["name"]]
    assert len(volumes) == 1
    return mounts[0], volumes[0]


def rules_for_service_account(r: Rendered, sa: str, namespace: str) -> list[tuple[str | None, dict]]:
    """(namespace or None for cluster-wide, rule) for every rule bound to the ServiceAccount."""
    def bound(binding):
        return any(s["kind"] == "ServiceAccount" and s["name"] == sa and s.get("namespace") == namespace
                   for s in binding.get("subjects", []))

    out = []
    for binding in r.of_kind("ClusterRoleBinding"):
        if bound(binding):
            assert binding["roleRef"]["kind"] == "ClusterRole"
            role = r.one("ClusterRole", binding["roleRef"]["name"])
            out += [(None, rule) for rule in role["rules"]]
    for binding in r.of_kind("RoleBinding"):
        if bound(binding):
            ns = binding["metadata"]["namespace"]
            ref = binding["roleRef"]
            if ref["kind"] == "Role":
                role = [o for o in r.of_kind("Role")
                        if o["metadata"]["name"] == ref["name"] and o["metadata"]["namespace"] == ns]
                assert len(role) == 1, f"RoleBinding {binding['metadata']['name']} points at a missing Role"
                out += [(ns, rule) for rule in role[0]["rules"]]
            else:
                out += [(ns, rule) for rule in r.one("ClusterRole", ref["name"])["rules"]]
    return out


def allowed(rules: list[tuple[str | None, dict]], group: str, resource: str, verb: str,
            namespace: str | None = None) -> bool:
    """Whether the rules allow verb on group/resource (in namespace, or cluster-wide if None)."""
    for ns, rule in rules:
        if ns is not None and ns != namespace:
            continue
        if (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", [])) and \
           (resource in rule.get("resources", []) or "*" in rule.get("resources", [])) and \
           (verb in rule.get("verbs", []) or "*" in rule.get("verbs", [])):
            return True
    return False


def load_render_module():
    spec = importlib.util.spec_from_file_location("deploy_render", REPO / "deploy" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def example_objects() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(EXAMPLES_DIR.glob("*.yaml"))}


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", params=list(SCENARIOS))
def rendered(request) -> Rendered:
    return render(SCENARIOS[request.param])


@pytest.fixture(scope="module", params=list(ALL_SCENARIOS))
def any_rendered(request) -> Rendered:
    return render(ALL_SCENARIOS[request.param])


@pytest.fixture(scope="module")
def multi() -> Rendered:
    return render(MULTI_VALUES)


@pytest.fixture(scope="module")
def default() -> Rendered:
    return render()


@pytest.fixture(scope="module")
def custom() -> Rendered:
    return render(CUSTOM_VALUES)


# --------------------------------------------------------------------------- helm lint and schemas

def test_helm_engine_is_the_real_one():
    assert helm_python.helm_sdk_version().startswith("v"), helm_python.helm_sdk_version()
    with helm_python.Chart.load(CHART_DIR) as chart:
        assert chart.metadata["apiVersion"] == "v2"
        assert chart.metadata["appVersion"] == "0.1.0"
        assert chart.schema is not None, "values.schema.json is missing"


@pytest.mark.parametrize("scenario", list(ALL_SCENARIOS))
@pytest.mark.parametrize("kube_version", [f"v{v}.0" for v in K8S_VERSIONS])
def test_lint_strict_is_clean(scenario, kube_version):
    report = helm_python.lint(CHART_DIR, with_minimal(ALL_SCENARIOS[scenario]), strict=True,
                              namespace=NAMESPACE, kube_version=kube_version)
    assert report["total_charts_linted"] == 1
    assert report["errors"] == [], report
    # Severity 2 = warning, 3 = error; strict mode fails on both. Info (1) is fine.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_every_object_passes_kubernetes_schema(any_rendered, k8s_version):
    checked = set()
    for obj in any_rendered.objects:
        if obj["kind"] in CRD_KINDS:
            continue
        # strict: unknown fields are errors too.
        kubernetes_validate.validate(obj, k8s_version, strict=True)
        checked.add(obj["kind"])
    expected = {"CSIDriver", "StatefulSet", "DaemonSet", "ServiceAccount", "ClusterRole",
                "ClusterRoleBinding", "Role", "RoleBinding", "StorageClass"}
    assert expected <= checked, expected - checked


def test_schema_versions_are_shipped():
    shipped = {kv_utils.major_minor(v) for v in kv_utils.all_versions()}
    assert set(K8S_VERSIONS) <= shipped, shipped


def test_only_crd_kinds_are_skipped(any_rendered):
    """Every kind without a core schema must be one of the known CRD kinds."""
    for obj in any_rendered.objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert obj["kind"] in CRD_KINDS, f"no schema for {obj['kind']}"
            assert obj["apiVersion"] == CRD_KINDS[obj["kind"]]


def test_objects_are_unique_and_namespaced_in_release(any_rendered):
    seen = set()
    cluster_scoped = {"CSIDriver", "ClusterRole", "ClusterRoleBinding", "StorageClass",
                      "VolumeSnapshotClass"}
    for obj in any_rendered.objects:
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        assert key not in seen, key
        seen.add(key)
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"], key
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE, key


# --------------------------------------------------------------------------- values.schema.json

@pytest.mark.parametrize("bad", [
    {"controller": {"replicas": "two"}},
    {"controller": {"replicas": 0}},
    {"controlller": {"replicas": 2}},
    {"storageClasses": [{"name": "lunanode-btrfs", "fsType": "btrfs"}]},
    {"controller": {"logFormat": "yaml"}},
    {"controller": {"apiNonce": "ahead"}},
    {"metrics": {"port": 70000}},
    {"image": {"driver": {"repository": "", "tag": "x"}}},
    {"node": {"kubeletDir": "relative/path"}},
    {"region": "toront"},
    {"node": {"regions": ["toronto", "nowhere"]}},
    {"node": {"regions": ["toronto", "toronto"]}},
    {"node": {"idSource": "dmi"}},
    # Replaced by `region`: a leftover must fail, not be ignored.
    {"defaultRegion": "toronto"},
    {"node": {"region": "toronto"}},
    {"controller": {"attachTarget": "/dev/vdb1"}},
    {"controller": {"attachTarget": "vda"}},
    {"preflightTest": {"fsType": "btrfs"}},
    {"preflightTest": {"deviceWaitSeconds": 0}},
    {"metrics": {"prometheusRule": {"enabled": "yes"}}},
    {"metrics": {"prometheusRule": {"rules": []}}},
    {"metrics": {"dashboard": {"labels": {"grafana_dashboard": 1}}}},
    {"metrics": {"dashboard": {"folder": "Storage"}}},
    {"metrics": {"node": {"port": 0}}},
    {"metrics": {"node": {"enabled": 1}}},
], ids=lambda v: json.dumps(v)[:60])
def test_schema_rejects_bad_values(bad):
    with pytest.raises(helm_python.HelmValuesError):
        render(bad)


def test_lint_fails_on_schema_violation():
    report = helm_python.lint(CHART_DIR, {"controller": {"replicas": "two"}}, strict=True)
    assert report["errors"], report
    assert any("replicas" in e for e in report["errors"])


def test_service_monitor_without_metrics_fails():
    with pytest.raises(helm_python.HelmRenderError, match="metrics.enabled"):
        render({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}})


# --------------------------------------------------------------------------- CSIDriver and driver name

def test_csidriver(rendered):
    driver = rendered.one("CSIDriver")
    assert driver["apiVersion"] == "storage.k8s.io/v1"
    assert driver["metadata"]["name"] == DRIVER_NAME
    assert driver["spec"] == {
        "attachRequired": True,
        "podInfoOnMount": False,
        "fsGroupPolicy": "File",
        "volumeLifecycleModes": ["Persistent"],
    }


def test_driver_name_agrees_everywhere(rendered):
    name = rendered.one("CSIDriver")["metadata"]["name"]
    assert name == DRIVER_NAME
    for sc in rendered.of_kind("StorageClass"):
        assert sc["provisioner"] == name, sc["metadata"]["name"]
    for vsc in rendered.of_kind("VolumeSnapshotClass"):
        assert vsc["driver"] == name
    node = rendered.node
    registration = flags(container(node, "node-driver-registrar"))["--kubelet-registration-path"]
    kubelet_dir = rendered.values.get("node", {}).get("kubeletDir", "/var/lib/kubelet")
    assert registration == f"{kubelet_dir}/plugins/{name}/csi.sock"
    _, plugin_volume = mount_at(node, container(node, "lunanode-csi"), "/csi")
    assert plugin_volume["hostPath"]["path"] == f"{kubelet_dir}/plugins/{name}"


def test_socket_path_agrees_between_driver_and_sidecars(rendered):
    for workload in (rendered.controller, rendered.node):
        driver = container(workload, "lunanode-csi")
        endpoint = flags(driver)["--endpoint"]
        assert endpoint.startswith("unix://")
        socket = endpoint[len("unix://"):]
        assert socket == SOCKET
        socket_dir = posixpath.dirname(socket)
        _, driver_volume = mount_at(workload, driver, socket_dir)
        sidecars = [c for c in pod_spec(workload)["containers"] if c["name"] != "lunanode-csi"]
        assert sidecars
        for c in sidecars:
            assert flags(c)["--csi-address"] == socket, c["name"]
            _, volume = mount_at(workload, c, socket_dir)
            assert volume["name"] == driver_volume["name"], c["name"]


def test_registrar_path_is_the_host_side_of_the_socket(rendered):
    node = rendered.node
    driver = container(node, "lunanode-csi")
    socket = flags(driver)["--endpoint"][len("unix://"):]
    _, volume = mount_at(node, driver, posixpath.dirname(socket))
    host_socket = posixpath.join(volume["hostPath"]["path"], posixpath.basename(socket))
    registrar = container(node, "node-driver-registrar")
    assert flags(registrar)["--kubelet-registration-path"] == host_socket
    _, registration = mount_at(node, registrar, "/registration")
    kubelet_dir = rendered.values.get("node", {}).get("kubeletDir", "/var/lib/kubelet")
    assert registration["hostPath"]["path"] == f"{kubelet_dir}/plugins_registry"


# --------------------------------------------------------------------------- node plugin

def test_node_plugin_privileged_with_bidirectional_kubelet_dir(rendered):
    node = rendered.node
    spec = pod_spec(node)
    driver = container(node, "lunanode-csi")
    assert driver["securityContext"]["privileged"] is True
    kubelet_dir = rendered.values.get("node", {}).get("kubeletDir", "/var/lib/kubelet")
    mount, volume = mount_at(node, driver, kubelet_dir)
    assert mount["mountPropagation"] == "Bidirectional"
    assert volume["hostPath"]["path"] == kubelet_dir
    mount, volume = mount_at(node, driver, "/dev")
    assert volume["hostPath"]["path"] == "/dev"  # /dev/disk/by-id comes with it
    mount, volume = mount_at(node, driver, "/run/udev")
    assert volume["hostPath"]["path"] == "/run/udev"
    assert mount.get("readOnly") is True
    # Bidirectional propagation is only allowed for privileged containers.
    for c in spec["containers"]:
        if c["name"] != "lunanode-csi":
            assert not c.get("securityContext", {}).get("privileged", False), c["name"]
            assert all(m.get("mountPropagation") != "Bidirectional" for m in c.get("volumeMounts", []))
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert {c["name"] for c in spec["containers"]} == {"lunanode-csi", "node-driver-registrar",
                                                        "liveness-probe"}


def test_node_driver_args(default, custom):
    args = flags(container(default.node, "lunanode-csi"))
    assert args["--mode"] == "node"
    assert args["--region"] == "toronto"
    assert args["--node-id-source"] == "auto"
    # The node ID is looked up on each node; the node holds no credentials.
    for absent in ("--node-id", "--max-volumes-per-node", "--by-id-dir",
                   "--api-id-file", "--api-key-file", "--metrics-addr"):
        assert absent not in args, absent
    args = flags(container(custom.node, "lunanode-csi"))
    assert args["--region"] == "montreal"
    assert args["--node-id-source"] == "smbios"
    assert args["--max-volumes-per-node"] == "8"
    assert args["--by-id-dir"] == "/dev/disk/by-id"
    assert "--node-id" not in args
    assert pod_spec(custom.node)["hostNetwork"] is True
    assert pod_spec(custom.node)["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert "hostNetwork" not in pod_spec(default.node)


# --------------------------------------------------------------------------- regions

def test_install_without_a_region_fails_early_saying_what_to_set():
    """The failure seen on a real cluster (no node knew its region, every claim Pending) is
    impossible: without a region the chart does not render, with Helm's own `required`."""
    for values in ({}, {"credentials": {"apiId": "x", "apiKey": "y"}}, {"region": ""}):
        with pytest.raises(helm_python.HelmRenderError) as err:
            render(values, minimal=False)
        message = str(err.value)
        assert "region is required" in message and "node.regions" in message, message
    # (`helm lint` alone stays clean: Helm lints in a mode where `required` only warns, so
    # the chart stays lintable without site values. install and template fail, as above.)


def test_every_node_daemonset_is_told_its_region(any_rendered):
    assert any_rendered.nodes
    for ds in any_rendered.nodes:
        args = flags(container(ds, "lunanode-csi"))
        assert args.get("--region") in REGIONS, (ds["metadata"]["name"], args)
    default_region = flags(container(any_rendered.controller, "lunanode-csi"))["--default-region"]
    assert default_region in {flags(container(ds, "lunanode-csi"))["--region"]
                              for ds in any_rendered.nodes}


@pytest.mark.parametrize("region", sorted(REGIONS))
def test_single_region_install_is_one_value(region):
    r = render({"region": region})
    (ds,) = r.nodes
    assert ds["metadata"]["name"] == f"{RELEASE}-node"
    assert flags(container(ds, "lunanode-csi"))["--region"] == region
    assert flags(container(r.controller, "lunanode-csi"))["--default-region"] == region
    # On every Linux node: no region label is needed.
    assert pod_spec(ds)["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert f"region {region}" in r.notes


def test_multi_region_has_one_node_daemonset_per_region(multi):
    label = MULTI_VALUES["node"]["regionLabel"]
    by_region = {}
    for ds in multi.nodes:
        region = flags(container(ds, "lunanode-csi"))["--region"]
        by_region[region] = ds
        assert ds["metadata"]["name"] == f"{RELEASE}-node-{region}"
        assert pod_spec(ds)["nodeSelector"] == {"kubernetes.io/os": "linux", label: region}
        # Distinct selectors, each matching its own pods only.
        selector = ds["spec"]["selector"]["matchLabels"]
        assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()
        assert selector["csi.lunanode.com/node-region"] == region
    assert set(by_region) == {"toronto", "montreal"}
    assert flags(container(multi.controller, "lunanode-csi"))["--default-region"] == "montreal"
    assert f"{label}=toronto" in multi.notes and "kubectl label node" in multi.notes
    # Without `region`, the first listed region is the default; a `region` no node is in fails.
    r = render({"node": {"regions": ["roubaix", "toronto"]}}, minimal=False)
    assert flags(container(r.controller, "lunanode-csi"))["--default-region"] == "roubaix"
    assert {ds["metadata"]["name"] for ds in r.nodes} == {f"{RELEASE}-node-roubaix",
                                                           f"{RELEASE}-node-toronto"}
    with pytest.raises(helm_python.HelmRenderError, match="not one of node.regions"):
        render({"region": "montreal", "node": {"regions": ["toronto"]}}, minimal=False)
    # The default label is the well-known one.
    r = render({"node": {"regions": ["toronto"]}}, minimal=False)
    assert pod_spec(r.node)["nodeSelector"]["topology.kubernetes.io/region"] == "toronto"


def test_node_id_source_is_a_chart_setting(default, custom):
    assert flags(container(default.node, "lunanode-csi"))["--node-id-source"] == "auto"
    assert flags(container(custom.node, "lunanode-csi"))["--node-id-source"] == "smbios"
    for source in ("auto", "metadata", "smbios"):
        r = render({"node": {"idSource": source}})
        assert flags(container(r.node, "lunanode-csi"))["--node-id-source"] == source


def helm_install_commands(path: Path) -> list[str]:
    """Every `helm install` command in a Markdown file, continuation lines joined."""
    text = path.read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines()
            if line.strip().startswith("helm install ")]


def values_of(command: str) -> dict:
    """The values a `helm install ... --set a.b=c` command sets."""
    values: dict = {}
    for key, value in re.findall(r"--set\s+'?([\w.]+)=([^\s']+)'?", command):
        *parents, leaf = key.split(".")
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        # Helm's list syntax: {a,b}
        node[leaf] = value[1:-1].split(",") if value.startswith("{") else value
    return values


@pytest.mark.parametrize("doc", ["README.md", "deploy/README.md"])
def test_documented_install_commands_render_a_working_install(doc):
    """Each documented `helm install` works as written: it sets the region, and every
    node plugin it renders reports one."""
    commands = helm_install_commands(REPO / doc)
    assert commands, f"{doc} documents no helm install"
    for command in commands:
        assert "deploy/helm/lunanode-csi" in command and "-n kube-system" in command, command
        values = values_of(command)
        assert values.get("region") in REGIONS or values.get("node", {}).get("regions"), command
        r = render(values, minimal=False)
        for ds in r.nodes:
            assert flags(container(ds, "lunanode-csi"))["--region"] in REGIONS, command


def test_driver_uses_only_known_flags(any_rendered):
    for workload in (any_rendered.controller, *any_rendered.nodes):
        c = container(workload, "lunanode-csi")
        assert c["args"][0] == "serve"
        unknown = set(flags(c)) - DRIVER_FLAGS
        assert not unknown, unknown


# --------------------------------------------------------------------------- helm test (preflight)

def preflight_pod(r: Rendered) -> dict:
    pods = [o for o in r.of_kind("Pod") if o["metadata"]["name"].endswith("-preflight")]
    assert len(pods) == 1, [o["metadata"]["name"] for o in r.of_kind("Pod")]
    return pods[0]


def test_attach_target_is_virtio_by_default_and_a_setting(default, custom):
    assert flags(container(default.controller, "lunanode-csi"))["--attach-target"] == "/dev/vda"
    r = render({"controller": {"attachTarget": "auto"}})
    assert flags(container(r.controller, "lunanode-csi"))["--attach-target"] == "auto"
    assert flags(preflight_pod(r)["spec"]["containers"][0])["--attach-target"] == "auto"


def test_helm_test_runs_preflight_with_the_node_plugins_access_and_the_controllers_credentials(any_rendered):
    pod = preflight_pod(any_rendered)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    # Not hook-succeeded: older Helm deletes the pod before `helm test --logs` reads it.
    assert pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    (c,) = spec["containers"]
    assert c["args"][0] == "preflight"
    f = flags(c)
    assert set(f) <= PREFLIGHT_FLAGS, set(f) - PREFLIGHT_FLAGS
    driver = container(any_rendered.controller, "lunanode-csi")
    df = flags(driver)
    # The controller's credentials, API and attach target.
    for key in ("--api-id-file", "--api-key-file", "--api-url", "--api-nonce", "--attach-target"):
        assert f.get(key) == df.get(key), key
    ctrl_secret = [v for v in pod_spec(any_rendered.controller)["volumes"] if v["name"] == "credentials"]
    test_secret = [v for v in spec["volumes"] if v["name"] == "credentials"]
    assert test_secret == ctrl_secret
    # The node plugin's access: privileged, the host's /dev and /run/udev, its ID source,
    # network and by-id directory.
    node = any_rendered.nodes[0]
    nf = flags(container(node, "lunanode-csi"))
    assert c["securityContext"]["privileged"] is True
    for key in ("--node-id-source", "--by-id-dir"):
        assert f.get(key) == nf.get(key), key
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert host["device-dir"] == mounts["device-dir"] == "/dev"
    assert host["udev-dir"] == mounts["udev-dir"] == "/run/udev"
    assert spec.get("hostNetwork", False) == pod_spec(node).get("hostNetwork", False)
    assert {"cpu", "memory"} <= set(c["resources"]["limits"])
    if len(any_rendered.nodes) == 1:
        assert f["--region"] == nf["--region"]
    else:
        # Multi-region: the pod may land in any of them; the cloud's region is reported.
        assert "--region" not in f


def test_preflight_flags_are_the_binarys():
    """Every flag the test pod may pass is one `lunanode-csi preflight` takes (when the
    binary has been built, as `bash tests/run-all.sh` does before these checks)."""
    binary = REPO / "target" / "debug" / "lunanode-csi"
    if not binary.exists():
        pytest.skip("the binary is not built")
    out = subprocess.run([str(binary), "preflight", "--help"], capture_output=True, text=True,
                         check=True).stdout
    known = set(re.findall(r"(--[a-z][a-z-]+)", out))
    assert PREFLIGHT_FLAGS <= known, PREFLIGHT_FLAGS - known


def test_helm_test_can_be_pinned_or_turned_off():
    r = render({"preflightTest": {"nodeName": "worker-3", "fsType": "xfs", "deviceWaitSeconds": 120}})
    pod = preflight_pod(r)
    assert pod["spec"]["nodeName"] == "worker-3"
    f = flags(pod["spec"]["containers"][0])
    assert (f["--fs-type"], f["--device-wait-secs"]) == ("xfs", "120")
    off = render({"preflightTest": {"enabled": False}})
    assert not [o for o in off.of_kind("Pod")]
    assert "helm test" not in off.notes


def test_plain_manifests_leave_the_helm_test_out():
    docs = [d for d in yaml.safe_load_all(PLAIN_MANIFESTS.read_text()) if d]
    assert not [d for d in docs if d["kind"] == "Pod"]
    assert "`helm test`" in PLAIN_MANIFESTS.read_text()


# --------------------------------------------------------------------------- controller

def test_controller_replicas(default, custom):
    assert default.controller["spec"]["replicas"] == 2
    assert custom.controller["spec"]["replicas"] == 1


# What each controller sidecar is told, by default, for a cluster with hundreds of claims
# (deploy/README.md, "Sidecar tuning"): {sidecar: {flag: value}}.
SIDECAR_TUNING = {
    "csi-provisioner": {"--kube-api-qps": "50", "--kube-api-burst": "100", "--worker-threads": "100",
                        "--retry-interval-start": "1s", "--retry-interval-max": "1m"},
    "csi-attacher": {"--kube-api-qps": "50", "--kube-api-burst": "100", "--worker-threads": "50",
                     "--retry-interval-start": "1s", "--retry-interval-max": "1m"},
    "csi-resizer": {"--kube-api-qps": "20", "--kube-api-burst": "50", "--workers": "20"},
    "csi-snapshotter": {"--kube-api-qps": "20", "--kube-api-burst": "50", "--worker-threads": "20"},
}
LEASE_FLAGS = {"--leader-election-lease-duration": "15s", "--leader-election-renew-deadline": "10s",
               "--leader-election-retry-period": "5s"}


def test_sidecars_are_tuned_for_hundreds_of_claims(default):
    for name, tuning in SIDECAR_TUNING.items():
        f = flags(container(default.controller, name))
        for flag, value in {**tuning, **LEASE_FLAGS, "--timeout": "60s"}.items():
            assert f.get(flag) == value, (name, flag, f.get(flag))
        assert "--leader-election" in f
    # Not set where the sidecar's default is meant.
    assert "--retry-interval-max" not in flags(container(default.controller, "csi-resizer"))
    # The driver's own API rate is raised in step (100 claims: ~140 calls in ~5 s).
    d = flags(container(default.controller, "lunanode-csi"))
    assert (d["--qps"], d["--burst"]) == ("20", "40")


def test_each_sidecar_is_settable_and_takes_extra_args():
    r = render({"sidecars": {
        "timeout": "90s",
        "leaderElection": {"leaseDuration": "30s", "renewDeadline": None, "retryPeriod": "2s"},
        "provisioner": {"kubeApiQps": 7.5, "workers": None, "timeout": "5m",
                        "extraArgs": ["--feature-gates=ReleaseLeaderElectionOnExit=true"]},
        "attacher": {"kubeApiBurst": None, "retryIntervalMax": None, "extraArgs": ["--max-grpc-log-length=100"]},
        "resizer": {"workers": 3, "retryIntervalMax": "10m"},
        "snapshotter": {"extraArgs": ["--automaxprocs"]},
        "nodeDriverRegistrar": {"extraArgs": ["--health-port=9809"]},
        "livenessProbe": {"extraArgs": ["--probe-timeout=3s"]},
    }})
    p = flags(container(r.controller, "csi-provisioner"))
    assert (p["--kube-api-qps"], p["--timeout"]) == ("7.5", "5m")
    assert "--worker-threads" not in p
    assert p["--feature-gates"] in ("Topology=true", "ReleaseLeaderElectionOnExit=true")
    args = container(r.controller, "csi-provisioner")["args"]
    assert args[-1] == "--feature-gates=ReleaseLeaderElectionOnExit=true", args
    assert p["--leader-election-lease-duration"] == "30s"
    assert "--leader-election-renew-deadline" not in p
    assert p["--leader-election-retry-period"] == "2s"
    a = flags(container(r.controller, "csi-attacher"))
    assert "--kube-api-burst" not in a and "--retry-interval-max" not in a
    assert a["--timeout"] == "90s" and a["--max-grpc-log-length"] == "100"
    z = flags(container(r.controller, "csi-resizer"))
    assert (z["--workers"], z["--retry-interval-max"]) == ("3", "10m")
    assert "--automaxprocs" in flags(container(r.controller, "csi-snapshotter"))
    assert flags(container(r.node, "node-driver-registrar"))["--health-port"] == "9809"
    for workload in (r.controller, r.node):
        assert flags(container(workload, "liveness-probe"))["--probe-timeout"] == "3s"


@pytest.mark.parametrize("bad", [
    {"sidecars": {"provisioner": {"kubeApiQps": 0}}},
    {"sidecars": {"attacher": {"workers": 0}}},
    {"sidecars": {"leaderElection": {"leaseDuration": "15"}}},
    {"sidecars": {"resizer": {"extraArgs": ["workers=3"]}}},
    {"sidecars": {"snapshotter": {"threads": 3}}},
], ids=lambda v: json.dumps(v)[:60])
def test_sidecar_tuning_schema(bad):
    with pytest.raises(helm_python.HelmValuesError):
        render(bad)


def test_a_restarted_controller_keeps_its_leader_identity(default):
    """The sidecars' leader-election identity is the pod's hostname. In a StatefulSet a
    replaced pod keeps its name, so it renews its own Leases at once instead of waiting
    for them to expire; pods start and are replaced in parallel, and a stopping pod has
    the time the driver needs to finish its calls."""
    ctrl = default.controller
    assert ctrl["kind"] == "StatefulSet"
    spec = ctrl["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["serviceName"]
    pod = pod_spec(ctrl)
    assert "hostname" not in pod and "subdomain" not in pod
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert not default.of_kind("Deployment")


def test_controller_driver_args_and_credentials(rendered):
    ctrl = rendered.controller
    driver = container(ctrl, "lunanode-csi")
    args = flags(driver)
    assert args["--mode"] == "controller"
    id_file, key_file = args["--api-id-file"], args["--api-key-file"]
    assert (id_file, key_file) == ("/etc/lunanode/api-id", "/etc/lunanode/api-key")
    mount, volume = mount_at(ctrl, driver, "/etc/lunanode")
    assert mount["readOnly"] is True
    secret_name = volume["secret"]["secretName"]
    items = {i["key"]: i["path"] for i in volume["secret"]["items"]}
    assert items == {"api-id": "api-id", "api-key": "api-key"}
    existing = rendered.values.get("credentials", {}).get("existingSecret")
    secrets = rendered.of_kind("Secret")
    if existing:
        assert secret_name == existing
        assert secrets == []
    else:
        assert secret_name == f"{RELEASE}-credentials"
        secret = rendered.one("Secret", secret_name)
        assert set(secret["stringData"]) == {"api-id", "api-key"}
    assert args["--default-region"] == rendered.values["region"]
    # The controller is the only component that holds credentials.
    for c in pod_spec(rendered.node)["containers"]:
        assert all(m["mountPath"] != "/etc/lunanode" for m in c.get("volumeMounts", []))


def test_chart_created_secret_carries_values():
    r = render({"credentials": {"apiId": "my-id", "apiKey": "my-key"}})
    secret = r.one("Secret", f"{RELEASE}-credentials")
    assert secret["stringData"] == {"api-id": "my-id", "api-key": "my-key"}
    assert "WARNING" not in r.notes
    assert "WARNING" in render().notes  # no credentials given
    # Rotating the credentials restarts the controller.
    annotations = r.controller["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/credentials"] != \
        render().controller["spec"]["template"]["metadata"]["annotations"]["checksum/credentials"]


def test_controller_optional_driver_args(default, custom):
    args = flags(container(default.controller, "lunanode-csi"))
    for absent in ("--api-url", "--api-max-in-flight", "--api-nonce", "--region", "--node-id"):
        assert absent not in args, absent
    assert args["--log-format"] == "json" and args["--log-level"] == "info"
    # null keeps the driver's own default.
    args = flags(container(render({"controller": {"qps": None, "burst": None}}).controller, "lunanode-csi"))
    assert "--qps" not in args and "--burst" not in args
    args = flags(container(custom.controller, "lunanode-csi"))
    assert args["--api-url"] == "https://dynamic.lunanode.com/api"
    assert args["--qps"] == "5" and args["--burst"] == "10"
    # 0 (no bound) is a value, not an absent one.
    assert args["--api-max-in-flight"] == "0"
    assert args["--api-nonce"] == "increasing"
    assert args["--log-format"] == "text" and args["--log-level"] == "debug"
    assert args["--default-region"] == "montreal"


def test_controller_sidecars(rendered):
    ctrl = rendered.controller
    names = [c["name"] for c in pod_spec(ctrl)["containers"]]
    assert names == ["lunanode-csi", "csi-provisioner", "csi-attacher", "csi-resizer",
                     "csi-snapshotter", "liveness-probe"]
    prov = flags(container(ctrl, "csi-provisioner"))
    assert prov["--feature-gates"] == "Topology=true"
    assert "--extra-create-metadata" in prov
    assert prov["--default-fstype"] == "ext4"
    assert re.fullmatch(r"\d+(ms|s|m|h)", prov["--timeout"])
    assert "--extra-create-metadata" in flags(container(ctrl, "csi-snapshotter"))
    assert flags(container(ctrl, "csi-resizer")).get("--handle-volume-inuse-error") in (None, "true")
    for name in LEADER_ELECTED:
        f = flags(container(ctrl, name))
        assert "--leader-election" in f, name
        assert f["--leader-election-namespace"] == NAMESPACE, name
        assert "--timeout" in f, name


def test_liveness_wiring(rendered):
    for workload, port in ((rendered.controller, 9898), (rendered.node, 9899)):
        probe_sidecar = flags(container(workload, "liveness-probe"))
        assert probe_sidecar["--health-port"] == str(port)
        driver = container(workload, "lunanode-csi")
        ports = {p["name"]: p["containerPort"] for p in driver["ports"]}
        assert ports["healthz"] == port
        probe = driver["livenessProbe"]["httpGet"]
        assert probe == {"path": "/healthz", "port": "healthz"}


def test_controller_pdb_and_selectors(default, custom):
    for r in (default, custom):
        for workload in (r.controller, r.node):
            selector = workload["spec"]["selector"]["matchLabels"]
            labels = workload["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items()
        # Controller and node pods must not match each other's selectors.
        assert r.controller["spec"]["selector"]["matchLabels"] != r.node["spec"]["selector"]["matchLabels"]
    pdb = default.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == default.controller["spec"]["selector"]["matchLabels"]
    assert custom.of_kind("PodDisruptionBudget") == []


def test_every_container_has_requests_and_limits(rendered):
    for workload in (rendered.controller, rendered.node):
        for c in pod_spec(workload)["containers"]:
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), (workload["kind"], c["name"], kind)


def test_controller_is_unprivileged(rendered):
    spec = pod_spec(rendered.controller)
    assert spec["securityContext"]["runAsNonRoot"] is True
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert not sc.get("privileged", False)


# --------------------------------------------------------------------------- images

def test_default_images(default):
    with helm_python.Chart.load(CHART_DIR) as chart:
        app_version = chart.metadata["appVersion"]
        values = chart.values
    for key, (repo, tag) in UPSTREAM_IMAGES.items():
        assert (values["image"][key]["repository"], values["image"][key]["tag"]) == (repo, tag)
    images = {c["name"]: c["image"] for w in (default.controller, default.node)
              for c in pod_spec(w)["containers"]}
    assert images["lunanode-csi"] == f"ghcr.io/lunanode-csi/lunanode-csi:{app_version}"
    assert images["csi-provisioner"] == "registry.k8s.io/sig-storage/csi-provisioner:v5.3.0"
    assert images["csi-attacher"] == "registry.k8s.io/sig-storage/csi-attacher:v4.9.0"
    assert images["csi-resizer"] == "registry.k8s.io/sig-storage/csi-resizer:v1.14.0"
    assert images["csi-snapshotter"] == "registry.k8s.io/sig-storage/csi-snapshotter:v8.3.0"
    assert images["liveness-probe"] == "registry.k8s.io/sig-storage/livenessprobe:v2.16.0"
    assert images["node-driver-registrar"] == \
        "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.14.0"


def test_custom_images(custom):
    image_values = CUSTOM_VALUES["image"]
    key_of = {"lunanode-csi": "driver", "csi-provisioner": "csiProvisioner",
              "csi-attacher": "csiAttacher", "csi-resizer": "csiResizer",
              "csi-snapshotter": "csiSnapshotter", "liveness-probe": "livenessProbe",
              "node-driver-registrar": "nodeDriverRegistrar"}
    for workload in (custom.controller, custom.node):
        spec = pod_spec(workload)
        assert spec["imagePullSecrets"] == [{"name": "mirror-pull"}]
        for c in spec["containers"]:
            v = image_values[key_of[c["name"]]]
            assert c["image"] == f"{v['repository']}:{v['tag']}"
        assert container(workload, "lunanode-csi")["imagePullPolicy"] == "Always"


# --------------------------------------------------------------------------- RBAC

def test_each_sidecar_has_the_rbac_it_needs(rendered):
    ctrl = rendered.controller
    sa = pod_spec(ctrl)["serviceAccountName"]
    rendered.one("ServiceAccount", sa)
    rules = rules_for_service_account(rendered, sa, NAMESPACE)
    missing = []
    for sidecar, needed in NEEDED_RULES.items():
        container(ctrl, sidecar)  # the sidecar runs in this pod, under this ServiceAccount
        for (group, resource), verbs in needed.items():
            for verb in sorted(verbs):
                if not allowed(rules, group, resource, verb):
                    missing.append((sidecar, group, resource, verb))
    for sidecar in LEADER_ELECTED:
        lease_ns = flags(container(ctrl, sidecar))["--leader-election-namespace"]
        for (group, resource), verbs in LEASE_RULE.items():
            for verb in sorted(verbs):
                if not allowed(rules, group, resource, verb, namespace=lease_ns):
                    missing.append((sidecar, group, resource, verb, lease_ns))
    assert not missing, missing


def test_rbac_is_not_wildcard_and_leases_are_namespaced(rendered):
    for role in rendered.of_kind("ClusterRole") + rendered.of_kind("Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (role["metadata"]["name"], rule)
            # Secrets are read only through the mounted volume.
            assert "secrets" not in rule["resources"], role["metadata"]["name"]
    for role in rendered.of_kind("ClusterRole"):
        assert all("leases" not in rule["resources"] for rule in role["rules"])


def test_node_service_account_has_no_api_access(rendered):
    sa = pod_spec(rendered.node)["serviceAccountName"]
    assert rules_for_service_account(rendered, sa, NAMESPACE) == []
    assert pod_spec(rendered.node)["automountServiceAccountToken"] is False


# --------------------------------------------------------------------------- classes

def test_default_storage_classes(default):
    classes = {sc["metadata"]["name"]: sc for sc in default.of_kind("StorageClass")}
    assert set(classes) == {"lunanode-ext4", "lunanode-xfs"}
    for name, fs in (("lunanode-ext4", "ext4"), ("lunanode-xfs", "xfs")):
        sc = classes[name]
        assert sc["parameters"] == {"csi.storage.k8s.io/fstype": fs}
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        assert sc["allowVolumeExpansion"] is True
        assert sc["reclaimPolicy"] == "Delete"
    default_marked = [n for n, sc in classes.items()
                      if sc["metadata"].get("annotations", {})
                      .get("storageclass.kubernetes.io/is-default-class") == "true"]
    assert default_marked == ["lunanode-ext4"]


def test_custom_storage_class_region_and_topology(custom):
    sc = custom.one("StorageClass", "lunanode-montreal-xfs")
    assert sc["parameters"] == {"csi.storage.k8s.io/fstype": "xfs", "region": "montreal"}
    assert sc["reclaimPolicy"] == "Retain"
    assert sc["mountOptions"] == ["noatime"]
    assert sc["allowedTopologies"] == [{"matchLabelExpressions": [
        {"key": TOPOLOGY_KEY, "values": ["montreal"]}]}]


def test_volume_snapshot_class(default, custom):
    vsc = default.one("VolumeSnapshotClass")
    assert vsc["apiVersion"] == CRD_KINDS["VolumeSnapshotClass"]
    assert vsc["metadata"]["name"] == "lunanode-snapshot"
    assert vsc["driver"] == DRIVER_NAME
    assert vsc["deletionPolicy"] == "Delete"
    assert vsc["metadata"]["annotations"]["snapshot.storage.kubernetes.io/is-default-class"] == "true"
    assert set(vsc) <= {"apiVersion", "kind", "metadata", "driver", "deletionPolicy", "parameters"}
    vsc = custom.one("VolumeSnapshotClass")
    assert vsc["deletionPolicy"] == "Retain" and "annotations" not in vsc["metadata"]
    assert render({"volumeSnapshotClass": {"create": False}}).of_kind("VolumeSnapshotClass") == []


# --------------------------------------------------------------------------- topology

def test_topology_key(default, custom):
    assert TOPOLOGY_KEY in default.notes
    assert TOPOLOGY_KEY in (REPO / "deploy" / "README.md").read_text()
    assert flags(container(default.controller, "csi-provisioner"))["--feature-gates"] == "Topology=true"
    keys = {expr["key"] for sc in custom.of_kind("StorageClass")
            for term in sc.get("allowedTopologies", []) for expr in term["matchLabelExpressions"]}
    assert keys == {TOPOLOGY_KEY}


@pytest.mark.parametrize("const, expected", [("TOPOLOGY_KEY", TOPOLOGY_KEY),
                                             ("DRIVER_NAME", DRIVER_NAME)])
def test_constants_match_driver_source(const, expected):
    """The driver name and topology key the chart uses are the ones the driver declares."""
    found = set()
    for path in (REPO / "src").rglob("*.rs"):
        found |= set(re.findall(rf'\bconst\s+{const}\s*:\s*&(?:\'static\s+)?str\s*=\s*"([^"]*)"',
                                path.read_text()))
    if not found:
        pytest.skip(f"the driver source declares no {const}")
    assert found == {expected}, found


# --------------------------------------------------------------------------- metrics

def test_metrics_on_by_default_without_service_monitor(default):
    assert len(default.of_kind("Service")) == 1 and default.of_kind("ServiceMonitor") == []
    assert flags(container(default.controller, "lunanode-csi"))["--metrics-addr"] == "0.0.0.0:9808"


def test_metrics_can_be_turned_off():
    r = render({"metrics": {"enabled": False}})
    assert r.of_kind("Service") == [] and r.of_kind("ServiceMonitor") == []
    assert "--metrics-addr" not in flags(container(r.controller, "lunanode-csi"))


def test_metrics_service_and_service_monitor(custom):
    driver = container(custom.controller, "lunanode-csi")
    assert flags(driver)["--metrics-addr"] == "0.0.0.0:9808"
    ports = {p["name"]: p["containerPort"] for p in driver["ports"]}
    assert ports["metrics"] == 9808
    service = custom.one("Service")
    pod_labels = custom.controller["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9808, "targetPort": "metrics",
                                         "protocol": "TCP"}]
    # ServiceMonitor: checked structurally (no core schema for it).
    sm = custom.one("ServiceMonitor")
    assert sm["apiVersion"] == CRD_KINDS["ServiceMonitor"]
    assert sm["metadata"]["namespace"] == NAMESPACE
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint["interval"])
    assert set(sm["spec"]) == {"selector", "namespaceSelector", "endpoints"}


def test_metrics_without_service_monitor():
    r = render({"metrics": {"enabled": True}})
    assert len(r.of_kind("Service")) == 1 and r.of_kind("ServiceMonitor") == []


# --------------------------------------------------------------------------- monitoring

MONITORING_KINDS = ("PrometheusRule", "PodMonitor", "ConfigMap")
# The jobs the chart's monitors name, which the rules and the dashboard select.
JOBS = {"controller": "lunanode-csi-controller", "node": "lunanode-csi-node"}


def relabeled_job(endpoint: dict) -> str:
    (job,) = [r["replacement"] for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
    return job


def test_monitoring_is_off_by_default(default):
    for kind in MONITORING_KINDS:
        assert default.of_kind(kind) == [], kind
    args = container(default.node, "lunanode-csi")["args"]
    assert not any(a.startswith("--metrics-addr") for a in args), args
    assert "metrics" not in {p["name"] for p in container(default.node, "lunanode-csi")["ports"]}


def test_plain_manifests_have_no_monitoring_objects():
    docs = [d for d in yaml.safe_load_all(PLAIN_MANIFESTS.read_text()) if d]
    assert {d["kind"] for d in docs}.isdisjoint(MONITORING_KINDS)
    for ds in (d for d in docs if d["kind"] == "DaemonSet"):
        assert not any("--metrics-addr" in a for a in container(ds, "lunanode-csi")["args"])


def test_the_charts_monitoring_files_are_deploy_monitoring():
    linked = CHART_DIR / "monitoring"
    assert linked.is_symlink() and linked.resolve() == MONITORING_DIR.resolve()
    assert (CHART_DIR / ".helmignore").read_text().count("monitoring/*.test.yaml") == 1


def test_prometheus_rule_is_the_rules_file():
    r = render(MONITORING_VALUES)
    rule = r.one("PrometheusRule")
    assert rule["apiVersion"] == CRD_KINDS["PrometheusRule"]
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    # One source: the rules Prometheus loads without the operator, unchanged.
    assert rule["spec"] == yaml.safe_load((MONITORING_DIR / "lunanode-csi.rules.yaml").read_text())
    alerts = [a for g in rule["spec"]["groups"] for a in g["rules"]]
    assert len(alerts) >= 9
    runbooks = (REPO / "docs" / "runbooks.md").read_text()
    for a in alerts:
        name = a["alert"]
        assert a["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description", "runbook_url"} <= set(a["annotations"]), name
        assert a["annotations"]["runbook_url"].endswith("docs/runbooks.md#" + name.lower()), name
        assert re.search(rf"^## {name}$", runbooks, re.MULTILINE), f"no runbook section for {name}"


def test_notes_name_the_monitoring_objects():
    r = render(MONITORING_VALUES)
    assert "prometheusrule/lunanode-csi;" in r.notes
    assert "configmap/lunanode-csi-dashboard" in r.notes
    assert "metrics.node.enabled" not in r.notes
    r = render({"metrics": {"prometheusRule": {"enabled": True}}})
    assert "--set metrics.node.enabled=true" in r.notes


def test_prometheus_rule_needs_metrics():
    with pytest.raises(helm_python.HelmRenderError, match="metrics.enabled"):
        render({"metrics": {"enabled": False, "prometheusRule": {"enabled": True}}})


def test_rules_select_the_jobs_the_monitors_name():
    r = render(MONITORING_VALUES)
    (sm_endpoint,) = r.one("ServiceMonitor")["spec"]["endpoints"]
    (pm_endpoint,) = r.one("PodMonitor")["spec"]["podMetricsEndpoints"]
    assert relabeled_job(sm_endpoint) == JOBS["controller"]
    assert relabeled_job(pm_endpoint) == JOBS["node"]
    rules = yaml.safe_load((MONITORING_DIR / "lunanode-csi.rules.yaml").read_text())
    exprs = [a["expr"] for g in rules["groups"] for a in g["rules"]]
    dashboard = json.loads((MONITORING_DIR / "lunanode-csi-dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    selectors = [m for e in exprs for m in re.findall(r'job(=~?)"([^"]+)"', e)]
    assert selectors and all(s for s in selectors)
    for op, value in selectors:
        matched = {j for j in JOBS.values()
                   if (j == value if op == "=" else re.fullmatch(value, j))}
        assert matched, f"job{op}{value!r} selects neither of {JOBS}"
    # Every expression selects the driver's jobs: nothing from another application.
    for e in exprs:
        for metric in re.findall(r"\b((?:csi|lunanode|process)_[a-z_]+|up)\{([^}]*)\}", e):
            assert "job" in metric[1], f"{metric[0]} without a job selector in {e}"


def test_dashboard_configmap():
    r = render(MONITORING_VALUES)
    cm = r.one("ConfigMap")
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Storage"}
    (name,) = cm["data"]
    assert name.endswith(".json")
    shipped = (MONITORING_DIR / "lunanode-csi-dashboard.json").read_text()
    assert json.loads(cm["data"][name]) == json.loads(shipped)
    assert len(cm["data"][name].encode()) < 256 * 1024
    dashboard = json.loads(shipped)
    assert dashboard["uid"] == "lunanode-csi"
    ds = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert [v["query"] for v in ds] == ["prometheus"]
    titles = {p["title"] for p in dashboard["panels"]}
    for want in ("RPC rate by method", "RPC errors by method", "RPC latency by method",
                 "API calls by action and result", "Waits by kind against the cloud's time",
                 "Operations in flight", "Attached volumes per node", "Memory", "CPU"):
        assert want in titles, want
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
    # Another sidecar label, as some Grafana installs are set up (null drops the default).
    r = render({"metrics": {"dashboard": {"enabled": True,
                                          "labels": {"grafana_dashboard": None, "dashboards": "grafana"}}}})
    assert r.one("ConfigMap")["metadata"]["labels"]["dashboards"] == "grafana"
    assert "grafana_dashboard" not in r.one("ConfigMap")["metadata"]["labels"]


def test_node_metrics_and_their_pod_monitor():
    r = render(MONITORING_VALUES)
    driver = container(r.node, "lunanode-csi")
    assert flags(driver)["--metrics-addr"] == "0.0.0.0:9809"
    assert {"name": "metrics", "containerPort": 9809, "protocol": "TCP"} in driver["ports"]
    pm = r.one("PodMonitor")
    assert pm["metadata"]["namespace"] == NAMESPACE
    assert pm["metadata"]["labels"]["release"] == "prometheus"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    pod_labels = r.node["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    controller_labels = r.controller["spec"]["template"]["metadata"]["labels"]
    assert not pm["spec"]["selector"]["matchLabels"].items() <= controller_labels.items()
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_node_name"],
            "targetLabel": "node"} in endpoint["relabelings"]
    # Every region's DaemonSet serves them; without a ServiceMonitor there is no PodMonitor.
    multi = render({**MULTI_VALUES, "metrics": {"node": {"enabled": True, "port": 19809}}})
    assert len(multi.nodes) == 2
    for ds in multi.nodes:
        assert flags(container(ds, "lunanode-csi"))["--metrics-addr"] == "0.0.0.0:19809"
    assert multi.of_kind("PodMonitor") == []


# --------------------------------------------------------------------------- NOTES

def test_notes(default, custom):
    for r in (default, custom):
        assert DRIVER_NAME in r.notes
        assert "OFFLINE" in r.notes
        assert "snapshot-controller" in r.notes
    assert "lunanode-ext4 (default)" in default.notes
    assert "region montreal" in custom.notes
    assert "controller-metrics" in custom.notes


# --------------------------------------------------------------------------- plain manifests

def test_plain_manifests_match_a_fresh_render():
    module = load_render_module()
    fresh = module.render_manifests()
    assert PLAIN_MANIFESTS.read_text() == fresh, \
        "deploy/kubernetes/ is out of date: run python deploy/render.py"


def test_plain_manifests_are_the_default_render(default):
    docs = [d for d in yaml.safe_load_all(PLAIN_MANIFESTS.read_text()) if d]
    key = lambda o: (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])  # noqa: E731
    installed = [o for o in default.objects
                 if "helm.sh/hook" not in (o["metadata"].get("annotations") or {})]
    assert sorted(docs, key=key) == sorted(installed, key=key)
    for obj in docs:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    # Install order: RBAC and Secret before the workloads that use them.
    kinds = [d["kind"] for d in docs]
    assert kinds.index("Secret") < kinds.index("StatefulSet")
    assert max(i for i, k in enumerate(kinds) if k.startswith(("Cluster", "Role"))) < kinds.index("DaemonSet")


def test_render_check_mode_detects_drift(tmp_path, monkeypatch):
    module = load_render_module()
    assert module.main(["--check"]) == 0
    stale = tmp_path / "lunanode-csi.yaml"
    stale.write_text(PLAIN_MANIFESTS.read_text().replace("replicas: 2", "replicas: 3"))
    monkeypatch.setattr(module, "OUTPUT", stale)
    assert module.main(["--check"]) == 1


# --------------------------------------------------------------------------- Dockerfile and docs

def test_dockerfile():
    text = (REPO / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    # Three stages: build, assemble the root with deploy/image/rootfs.sh, and scratch + it.
    assert froms == [("rust:1-bookworm", "builder"), ("debian:bookworm", "rootfs"), ("scratch", "")]
    assert BUILD_COMMAND in text
    assemble = text[text.index("FROM debian:bookworm AS rootfs"):text.index("FROM scratch")]
    assert "COPY --from=builder /lunanode-csi /lunanode-csi" in assemble
    assert re.search(r"^RUN .*\n?.*bash /src/deploy/image/rootfs\.sh /rootfs /lunanode-csi$",
                     assemble, re.MULTILINE)
    # What goes in is the script's alone: no package is installed in this stage itself.
    assert "apt-get install" not in assemble
    runtime = text[text.index("FROM scratch"):]
    assert [l for l in runtime.splitlines() if l.startswith(("COPY", "RUN", "ADD"))] == [
        "COPY --from=rootfs /rootfs/ /"]
    assert "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in runtime
    assert 'ENTRYPOINT ["/usr/local/bin/lunanode-csi"]' in runtime


def test_dockerfile_copies_what_the_build_context_holds():
    text = (REPO / "Dockerfile").read_text()
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for source in re.findall(r"^COPY (?!--from)(\S+) \S+$", text, re.MULTILINE):
        if source == ".":
            continue
        assert (REPO / source).exists(), source
        # .dockerignore leaves out deploy/ but for the image's script.
        top = source.split("/")[0]
        if f"{top}/*" in ignored or f"{top}/" in ignored:
            assert any(source.startswith(l[1:].rstrip("/")) for l in ignored if l.startswith("!")), source
    assert "!deploy/image/" in ignored


def test_dockerfile_build_command_matches_docs():
    assert BUILD_COMMAND in (REPO / "deploy" / "README.md").read_text()


def test_deploy_readme():
    text = (REPO / "deploy" / "README.md").read_text()
    assert "helm install lunanode-csi deploy/helm/lunanode-csi -n kube-system" in text
    assert "--set credentials.apiId=" in text and "--set credentials.apiKey=" in text
    assert "snapshot-controller" in text
    with helm_python.Chart.load(CHART_DIR) as chart:
        top_level = set(chart.values) - {"nameOverride", "fullnameOverride"}
    for key in top_level:
        assert f"`{key}" in text, f"values key {key} is not in the README's table"


# --------------------------------------------------------------------------- examples

def test_examples_exist_and_are_described():
    readme = (EXAMPLES_DIR / "README.md").read_text()
    names = {"pvc-pod.yaml", "snapshot-restore.yaml", "cross-region-restore.yaml",
             "expansion.yaml", "raw-block.yaml"}
    assert names <= set(example_objects())
    for name in names:
        assert name in readme, name


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_examples_pass_kubernetes_schema(k8s_version):
    for name, objects in example_objects().items():
        assert objects, name
        for obj in objects:
            if obj["kind"] in CRD_KINDS:
                assert obj["apiVersion"] == CRD_KINDS[obj["kind"]], name
                continue
            kubernetes_validate.validate(obj, k8s_version, strict=True)


def test_examples_refer_to_existing_classes_and_claims(default):
    chart_classes = {sc["metadata"]["name"] for sc in default.of_kind("StorageClass")}
    snapshot_class = default.one("VolumeSnapshotClass")["metadata"]["name"]
    claims_everywhere = {o["metadata"]["name"] for objs in example_objects().values()
                         for o in objs if o["kind"] == "PersistentVolumeClaim"}
    for name, objects in example_objects().items():
        classes = chart_classes | {o["metadata"]["name"] for o in objects if o["kind"] == "StorageClass"}
        snapshots = {o["metadata"]["name"] for o in objects if o["kind"] == "VolumeSnapshot"}
        for o in objects:
            if o["kind"] == "StorageClass":
                assert o["provisioner"] == DRIVER_NAME, name
            if o["kind"] == "PersistentVolumeClaim":
                assert o["spec"]["storageClassName"] in classes, name
                source = o["spec"].get("dataSource")
                if source:
                    assert source["kind"] == "VolumeSnapshot" and source["name"] in snapshots, name
            if o["kind"] == "VolumeSnapshot":
                assert o["spec"]["volumeSnapshotClassName"] == snapshot_class, name
                assert o["spec"]["source"]["persistentVolumeClaimName"] in claims_everywhere, name


def test_cross_region_restore_example():
    objects = example_objects()["cross-region-restore.yaml"]
    sc = next(o for o in objects if o["kind"] == "StorageClass")
    assert sc["parameters"]["region"] == "montreal"
    assert sc["allowedTopologies"][0]["matchLabelExpressions"][0]["key"] == TOPOLOGY_KEY
    pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == sc["metadata"]["name"]
    assert pvc["spec"]["dataSource"]["kind"] == "VolumeSnapshot"
    assert "toronto" in (EXAMPLES_DIR / "cross-region-restore.yaml").read_text()


def test_expansion_example_says_offline():
    text = (EXAMPLES_DIR / "expansion.yaml").read_text()
    assert "OFFLINE" in text and "--replicas=0" in text
    assert "offline" in (EXAMPLES_DIR / "README.md").read_text().lower()


def test_raw_block_example():
    objects = example_objects()["raw-block.yaml"]
    pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    pod = next(o for o in objects if o["kind"] == "Pod")
    assert pvc["spec"]["volumeMode"] == "Block"
    (c,) = pod["spec"]["containers"]
    assert c["volumeDevices"][0]["name"] == pod["spec"]["volumes"][0]["name"]
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "volumeMounts" not in c
