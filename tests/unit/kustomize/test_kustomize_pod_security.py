"""Every pod the manifests make meets the baseline Pod Security Standard, which kustomize/README.md tells
operators to enforce on the namespace (so a pod of ours refused by it would be a deployment failure found
on the cluster, not here). The checks follow the standard's baseline controls
(https://kubernetes.io/docs/concepts/security/pod-security-standards/, Kubernetes 1.30)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kustomize_helpers import KUSTOMIZE, TARGETS, needs_kubectl, pod_templates, render

# Capabilities baseline lets a container add (the container runtime's defaults)
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def baseline_violations(where: str, template: dict[str, Any]) -> list[str]:
    """What in one pod template the baseline standard refuses; [] when it is admitted."""
    spec, found = template["spec"], []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(f"{where}: {field}")
    found += [f"{where}: hostPath volume {v['name']}" for v in spec.get("volumes", []) if "hostPath" in v]
    pod_context = spec.get("securityContext", {})
    found += [
        f"{where}: sysctl {s['name']}"
        for s in pod_context.get("sysctls", [])
        if s["name"] not in SAFE_SYSCTLS
    ]
    contexts = [(where, pod_context)]
    kinds = ("initContainers", "containers", "ephemeralContainers")
    for container in (c for kind in kinds for c in spec.get(kind, [])):
        name, context = f"{where} {container['name']}", container.get("securityContext", {})
        contexts.append((name, context))
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        added = set(context.get("capabilities", {}).get("add", [])) - BASELINE_CAPABILITIES
        if added:
            found.append(f"{name}: adds capabilities {sorted(added)}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount {context['procMount']}")
    for name, context in contexts:
        if context.get("seccompProfile", {}).get("type") == "Unconfined":
            found.append(f"{name}: seccomp Unconfined")
        if context.get("appArmorProfile", {}).get("type") == "Unconfined":
            found.append(f"{name}: AppArmor Unconfined")
        selinux = context.get("seLinuxOptions", {})
        if selinux.get("type", "") not in SELINUX_TYPES or {"user", "role"} & set(selinux):
            found.append(f"{name}: seLinuxOptions {selinux}")
    return found


def _all_pods(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [pod for doc in docs for pod in pod_templates(doc)]


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_meets_the_baseline_pod_security_standard(target: str) -> None:
    pods = _all_pods(render(target))
    assert len(pods) >= 5  # the Ray clusters' heads and workers, the RayJobs, Redis, the schedule Job
    assert [v for where, template in pods for v in baseline_violations(where, template)] == []


def test_the_storage_pod_meets_the_baseline_pod_security_standard() -> None:
    docs = [
        d for p in sorted((KUSTOMIZE / "storage").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())
    ]
    pods = _all_pods([d for d in docs if d])
    assert [where for where, _ in pods] == ["Pod/marn-data-loader"]
    assert [v for where, template in pods for v in baseline_violations(where, template)] == []


def test_the_baseline_check_refuses_what_the_standard_refuses() -> None:
    def pod(**spec: Any) -> dict[str, Any]:
        return {"spec": {"containers": [{"name": "c", "image": "i"}], **spec}}

    def container(**fields: Any) -> dict[str, Any]:
        return pod(containers=[{"name": "c", "image": "i", **fields}])

    assert baseline_violations("p", pod()) == []
    refused = {
        "host network": pod(hostNetwork=True),
        "host path": pod(volumes=[{"name": "root", "hostPath": {"path": "/"}}]),
        "unsafe sysctl": pod(securityContext={"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}),
        "privileged": container(securityContext={"privileged": True}),
        "SYS_ADMIN": container(securityContext={"capabilities": {"add": ["SYS_ADMIN"]}}),
        "hostPort": container(ports=[{"containerPort": 80, "hostPort": 80}]),
        "seccomp": container(securityContext={"seccompProfile": {"type": "Unconfined"}}),
        "selinux": pod(securityContext={"seLinuxOptions": {"type": "spc_t"}}),
        "init container": pod(initContainers=[{"name": "i", "securityContext": {"privileged": True}}]),
    }
    for what, template in refused.items():
        assert baseline_violations("p", template), what
    allowed = container(securityContext={"capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}})
    assert baseline_violations("p", allowed) == []


def test_the_readme_step_labels_the_namespace_baseline() -> None:
    text = (Path(KUSTOMIZE) / "README.md").read_text()
    assert "pod-security.kubernetes.io/enforce=baseline" in text
