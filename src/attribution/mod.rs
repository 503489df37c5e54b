//! Whose connection a socket is: its control group's path, from the cgroup
//! id the kernel gives with every full socket (`INET_DIAG_CGROUP_ID`), and
//! what the path says about its owner ([`Owner`]): the systemd unit, the
//! container and the Kubernetes pod. The ids are resolved through
//! [`CgroupCache`], a bounded map of the cgroup2 tree walked at start and
//! again for an unknown id at most once per `--cgroup-rescan`.
//!
//! The layouts read, deepest component first (`docs/record.md` lists
//! example paths):
//!
//! - systemd: the deepest `NAME.service` or `NAME.scope` is the unit
//!   (`/system.slice/nginx.service`, `/user.slice/user-1000.slice/session-2.scope`),
//!   unless the path names a container (whose scope its id names);
//! - containers: a component `docker-ID.scope`, `cri-containerd-ID.scope`,
//!   `crio-ID.scope`, `libpod-ID.scope` (the systemd cgroup driver) or a bare
//!   `ID` (cgroupfs: `/docker/ID`, `/kubepods/besteffort/podUID/ID`), ID being
//!   64 hex digits; CRI-O's `crio-conmon-ID.scope` is its monitor, not the
//!   container;
//! - Kubernetes: `podUID` (cgroupfs) or `kubepods[-QOS]-podUID.slice` (the
//!   systemd driver, with `_` for the UID's `-`).

mod cache;
pub mod processes;
pub(crate) mod published;

pub use cache::{find_cgroup2_root, CgroupCache, CgroupMetrics, CgroupView, MAX_CGROUP_PATH_LEN};

/// What a cgroup path says about who owns its sockets. Empty strings for
/// what it does not say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    /// From the cgroup2 root: `/` for the root, `/system.slice/x.service`.
    pub path: Box<str>,
    pub systemd_unit: Box<str>,
    /// 64 hex digits.
    pub container_id: Box<str>,
    /// The pod's UID as Kubernetes prints it (with `-`).
    pub pod_uid: Box<str>,
}

/// Longest systemd unit name (systemd's UNIT_NAME_MAX).
pub const MAX_UNIT_LEN: usize = 255;
/// A container id: 64 hex digits.
pub const CONTAINER_ID_LEN: usize = 64;
/// A UUID: 8-4-4-4-12 hex digits.
pub const POD_UID_LEN: usize = 36;

impl Owner {
    /// The owner `path` (from the cgroup2 root) tells of.
    pub fn of_path(path: &str) -> Owner {
        let components = || path.split('/').filter(|c| !c.is_empty()).rev();
        let find = |f: fn(&str) -> Option<String>| {
            components()
                .find_map(f)
                .unwrap_or_default()
                .into_boxed_str()
        };
        let container_id = find(|c| container_id(c).map(str::to_string));
        // A container's scope (`docker-ID.scope`) says no more than its id,
        // which is half a record's bytes again on a pod's long path.
        let systemd_unit = if container_id.is_empty() {
            find(systemd_unit)
        } else {
            Box::default()
        };
        Owner {
            path: path.into(),
            systemd_unit,
            container_id,
            pod_uid: find(pod_uid),
        }
    }

    /// What a person calls this connection's owner: the pod, else the
    /// container, else the systemd unit, else the path.
    pub fn service(&self) -> &str {
        service_of(
            &self.path,
            &self.systemd_unit,
            &self.container_id,
            &self.pod_uid,
        )
    }
}

/// [`Owner::service`] from a record's fields: the pod's UID, else the
/// container's id (its first 12 digits, as `docker ps` prints it), else the
/// unit, else the path; empty when all are.
pub fn service_of<'a>(path: &'a str, unit: &'a str, container: &'a str, pod: &'a str) -> &'a str {
    if !pod.is_empty() {
        pod
    } else if !container.is_empty() {
        &container[..container.len().min(12)]
    } else if !unit.is_empty() {
        unit
    } else {
        path
    }
}

fn systemd_unit(component: &str) -> Option<String> {
    let unit = component.ends_with(".service") || component.ends_with(".scope");
    (unit && component.len() <= MAX_UNIT_LEN).then(|| component.to_string())
}

/// The container id of one path component, if it names a container.
pub fn container_id(component: &str) -> Option<&str> {
    const RUNTIMES: [&str; 4] = ["docker-", "cri-containerd-", "crio-", "libpod-"];
    let id = match component.strip_suffix(".scope") {
        Some(scope) => RUNTIMES.iter().find_map(|p| scope.strip_prefix(p))?,
        None => component,
    };
    let hex = id.len() == CONTAINER_ID_LEN && id.bytes().all(|b| b.is_ascii_hexdigit());
    hex.then_some(id)
}

fn pod_uid(component: &str) -> Option<String> {
    let name = component.strip_suffix(".slice").unwrap_or(component);
    let at = name.rfind("pod")?;
    let before = &name[..at];
    // `podUID` alone (cgroupfs), or after `kubepods-` / `kubepods-QOS-`.
    if !(before.is_empty() || (before.starts_with("kubepods") && before.ends_with('-'))) {
        return None;
    }
    let uid = name[at + 3..].replace('_', "-");
    let groups: Vec<&str> = uid.split('-').collect();
    let shape = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]);
    let hex = groups
        .iter()
        .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
    (shape && hex).then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4b0c1d2e5a6978a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718";
    const UID: &str = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";

    fn owner(path: &str) -> (String, String, String, String) {
        let o = Owner::of_path(path);
        let service = o.service().to_string();
        (
            o.systemd_unit.into(),
            o.container_id.into(),
            o.pod_uid.into(),
            service,
        )
    }

    fn s(parts: [&str; 4]) -> (String, String, String, String) {
        parts.map(str::to_string).into()
    }

    #[test]
    fn systemd_services_and_sessions() {
        assert_eq!(owner("/"), s(["", "", "", "/"]));
        assert_eq!(
            owner("/system.slice/nginx.service"),
            s(["nginx.service", "", "", "nginx.service"])
        );
        assert_eq!(
            owner("/user.slice/user-1000.slice/session-2.scope"),
            s(["session-2.scope", "", "", "session-2.scope"])
        );
        // A service that delegates (containerd's shims, a nested manager):
        // the deepest unit.
        assert_eq!(
            owner("/system.slice/containerd.service/sub"),
            s(["containerd.service", "", "", "containerd.service"])
        );
        assert_eq!(owner("/system.slice"), s(["", "", "", "/system.slice"]));
    }

    #[test]
    fn containers_of_each_runtime() {
        let scope = |prefix: &str| format!("/system.slice/{prefix}{ID}.scope");
        for prefix in ["docker-", "cri-containerd-", "crio-", "libpod-"] {
            let path = scope(prefix);
            assert_eq!(owner(&path), s(["", ID, "", &ID[..12]]), "{path}");
        }
        // CRI-O's monitor process is not the container: its unit is.
        let conmon = owner(&scope("crio-conmon-"));
        assert_eq!(
            (conmon.0.as_str(), conmon.1.as_str()),
            (&*format!("crio-conmon-{ID}.scope"), "")
        );
        assert_eq!(owner(&format!("/docker/{ID}")), s(["", ID, "", &ID[..12]]));
        // Not 64 hex digits.
        assert_eq!(owner(&format!("/docker/{}", &ID[1..])).1, "");
        assert_eq!(owner(&format!("/docker/{}g", &ID[1..])).1, "");
    }

    #[test]
    fn kubernetes_pods_under_both_drivers() {
        let systemd_uid = UID.replace('-', "_");
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(owner(&systemd), s(["", ID, UID, UID]));
        let guaranteed = format!("/kubepods.slice/kubepods-pod{systemd_uid}.slice/crio-{ID}.scope");
        assert_eq!(owner(&guaranteed).2, UID);
        let cgroupfs = format!("/kubepods/besteffort/pod{UID}/{ID}");
        assert_eq!(owner(&cgroupfs), s(["", ID, UID, UID]));
        // The pod's own cgroup (its sandbox's sockets live in a container).
        assert_eq!(owner(&format!("/kubepods/pod{UID}")), s(["", "", UID, UID]));
        // Something else ending in a UUID is not a pod.
        assert_eq!(owner(&format!("/system.slice/ipod{UID}")).2, "");
        assert_eq!(owner("/kubepods/podnot-a-uid").2, "");
    }
}
